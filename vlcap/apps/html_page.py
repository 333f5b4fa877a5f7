"""The HTML of ``vlcap report`` (``html_report.Report`` -> one self-contained page).

Every text goes through ``esc`` (``html.escape`` with quotes): captions, references, file names
and config values come from files and are never markup. Paths in ``src`` are the report's own
relative names (``images/00001.jpg``), never a file's name. The only script sorts the tables
when a header is clicked; the page reads nothing but its own folder.
"""
import html
import json

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: .5em 0; }
td, th { border: 1px solid #ddd; padding: 4px 8px; vertical-align: top; }
th { background: #f4f4f4; text-align: left; } th.sortable { cursor: pointer; }
th.sortable::after { content: " \\2195"; color: #999; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
ul.refs { margin: 0; padding-left: 1.1em; color: #555; }
.score { font-size: 1.3em; margin-right: 2em; } .note { color: #666; }
figure { display: inline-block; margin: .5em; vertical-align: top; max-width: 100%; } figcaption { max-width: 1100px; }
img.attention, img#curves { max-width: 100%; } img.thumb { max-width: 160px; max-height: 160px; }
"""

SORT_SCRIPT = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  table.querySelectorAll("th").forEach(function (th, column) {
    th.classList.add("sortable");
    th.addEventListener("click", function () {
      var body = table.tBodies[0], ascending = th.dataset.order !== "asc";
      var rows = Array.prototype.slice.call(body.rows);
      function key(row) {
        var cell = row.cells[column], value = cell.dataset.sort;
        return value === undefined ? cell.textContent : (value === "" ? -Infinity : parseFloat(value));
      }
      rows.sort(function (a, b) {
        var x = key(a), y = key(b), order = x < y ? -1 : x > y ? 1 : 0;
        return ascending ? order : -order;
      });
      th.dataset.order = ascending ? "asc" : "desc";
      rows.forEach(function (row) { body.appendChild(row); });
    });
  });
});
"""


def esc(value):
    return html.escape(str(value), quote=True)


def number(value, spec=".4f"):
    """A right-aligned cell that sorts by its number ("" for a missing value)."""
    if value is None:
        return '<td class="num" data-sort="">—</td>'
    return f'<td class="num" data-sort="{value!r}">{format(value, spec)}</td>'


def table(table_id, header, rows, sortable=False):
    """``rows``: lists of ready ``<td>`` strings."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "\n".join(f"<tr>{''.join(cells)}</tr>" for cells in rows)
    classes = ' class="sortable"' if sortable else ""
    return f'<table id="{table_id}"{classes}><thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody></table>'


def config_value(value):
    return value if isinstance(value, str) else json.dumps(value)


def scores_section(report):
    scores = "".join(f'<span class="score">{esc(name)} <b>{value:.4f}</b></span>'
                     for name, value in report.scores.items())
    clip = f" CLIPScore with CLIP {esc(report.clip_model)}." if report.clip_model else ""
    return (f"<h2 id='scores'>Scores</h2><p>{scores}</p><p class='note'>{len(report.images)} images; "
            f"{esc(report.source)}. CIDEr-D on PTB tokens, comparable only with CIDErs against the same "
            f"references.{clip}</p>")


def run_section(report):
    """The run's parameters and curves."""
    parts = []
    if report.parameter_rows:
        rows = [[f"<td>{esc(part)}</td>", number(t, ","), number(f, ",")] for part, t, f in report.parameter_rows]
        parts.append("<h3>Parameters</h3>" + table("parameter-table", ("part", "trainable", "frozen"), rows))
    if report.curves:
        parts.append(f'<h3>Curves</h3><img id="curves" src="{esc(report.curves)}" alt="loss and metric curves">')
    return "<h2 id='run'>Run</h2>" + "\n".join(parts) if parts else ""


def config_section(report):
    """The full config, folded: long, and read less often than the rest."""
    if not report.config_rows:
        return ""
    rows = [[f"<td>{esc(key)}</td>", f"<td>{esc(config_value(value))}</td>"] for key, value in report.config_rows]
    return (f"<h2 id='config'>Config</h2><details><summary>{len(rows)} keys</summary>"
            + table("config-table", ("key", "value"), rows) + "</details>")


def references_list(references):
    return "<ul class='refs'>" + "".join(f"<li>{esc(r)}</li>" for r in references) + "</ul>"


def attention_section(report):
    figures = []
    for kind, image, png in report.attention:
        picture = (f'<img class="attention" src="{esc(png)}" alt="attention of {esc(image.stem)}">' if png else
                   f'<img class="thumb" src="{esc(image.thumbnail)}" alt="{esc(image.stem)}">')
        clip = "" if image.clipscore is None else f", CLIPScore {image.clipscore:.4f}"
        figures.append(f"<figure class='{kind}'>{picture}<figcaption><b>{kind}</b>: {esc(image.stem)} — "
                       f"“{esc(image.caption)}” (CIDEr {image.cider:.4f}{clip}){references_list(image.references)}"
                       "</figcaption></figure>")
    by = "CLIPScore" if report.clip_model else "CIDEr"
    return f"<h2 id='best-worst'>Best and worst by {by}</h2>" + "\n".join(figures)


def gallery_section(report):
    rows = [[number(rank, "d"), f'<td><img class="thumb" src="{esc(image.thumbnail)}" alt="{esc(image.stem)}"></td>',
             f"<td>{esc(image.stem)}</td>", f"<td>{esc(image.caption)}</td>",
             f"<td>{references_list(image.references)}</td>", number(image.cider), number(image.clipscore)]
            for rank, image in enumerate(report.images, 1)]
    header = ("rank", "image", "file", "generated caption", "references", "CIDEr", "CLIPScore")
    return ("<h2 id='gallery'>Gallery</h2><p class='note'>Click a column header to sort.</p>"
            + table("gallery-table", header, rows, sortable=True))


def render(report):
    notes = "".join(f"<p class='note'>{esc(note)}</p>" for note in report.notes)
    body = "\n".join([f"<h1>{esc(report.title)}</h1>", notes, scores_section(report), run_section(report),
                      attention_section(report), gallery_section(report), config_section(report)])
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(report.title)}</title>'
            f"<style>{STYLE}</style></head>\n<body>\n{body}\n<script>{SORT_SCRIPT}</script>\n</body></html>\n")
