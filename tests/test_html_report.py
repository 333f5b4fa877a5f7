"""vlcap report: a static HTML report, checked as a browser renders it (headless Chromium)."""
import csv
import html
import json
import re
import shutil
import subprocess

import pytest

from conftest import vlcap_cli
from vlcap.apps.html_report import flatten
from vlcap.core.config import read_yaml

# Run in the page once everything has loaded: which images the browser could draw, each table's
# body rows, and the gallery's CIDEr column after a click on its header (ascending sort).
PROBE = """<script>
window.addEventListener("load", function () {
  var images = Array.prototype.map.call(document.images, function (img) {
    return {src: img.getAttribute("src"), loaded: img.complete && img.naturalWidth > 0};
  });
  var tables = {};
  document.querySelectorAll("table[id]").forEach(function (t) { tables[t.id] = t.tBodies[0].rows.length; });
  var gallery = document.getElementById("gallery-table"), header = gallery.tHead.rows[0].cells, column = -1;
  for (var i = 0; i < header.length; i++) { if (header[i].textContent === "CIDEr") { column = i; } }
  header[column].click();
  var sorted = Array.prototype.map.call(gallery.tBodies[0].rows,
                                        function (r) { return parseFloat(r.cells[column].dataset.sort); });
  var out = document.createElement("pre");
  out.id = "vlcap-probe";
  out.textContent = JSON.stringify({images: images, tables: tables, sorted_cider: sorted});
  document.body.appendChild(out);
});
</script>"""


def browser():
    return next((path for path in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if path), None)


def rendered(report_dir):
    """What headless Chromium saw of the report opened from disk (``PROBE``'s record)."""
    if browser() is None:
        pytest.skip("no headless Chromium (apt-get install chromium; .ci/run installs it)")
    page = report_dir / "probe.html"
    page.write_text((report_dir / "index.html").read_text().replace("</body>", PROBE + "</body>"))
    dom = subprocess.run([browser(), "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000",
                          "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    found = re.search(r'<pre id="vlcap-probe">(.*?)</pre>', dom, re.S)
    assert found, dom[-2000:]
    return json.loads(html.unescape(found.group(1)))


def gallery_rows(page):
    return page.split('id="gallery-table"', 1)[1].split("</table>", 1)[0].count("<tr>") - 1  # less the header


@pytest.fixture(scope="module")
def run_report(tiny_runs, small_synthetic, tiny_clip, tmp_path_factory):
    root, _ = tiny_runs
    out = tmp_path_factory.mktemp("report") / "lora"
    result = vlcap_cli("report", root / "lora", "--images", small_synthetic / "images_val", "--annotations",
                       small_synthetic / "val.json", "--out", out, "--top", 1, "--clip-model", tiny_clip,
                       "--device", "cpu", "--max-length", 5)  # short captions: small attention figures
    assert result.exit_code == 0, result.output
    return out, result.output


def test_report_of_a_run_holds_its_captions_scores_curves_and_attention(run_report):
    out, output = run_report
    images = sorted(p.name for p in (out / "images").iterdir())
    assert images == ["00000.jpg", "00001.jpg", "00002.jpg", "00003.jpg"]  # the 4 validation images
    assert sorted(p.name for p in (out / "attention").iterdir()) == ["best-1.png", "worst-1.png"]
    assert (out / "curves.png").is_file() and not list(out.parent.glob(".lora.*"))  # no work folder left
    predictions = json.loads((out / "predictions.json").read_text())
    page = (out / "index.html").read_text()
    assert gallery_rows(page) == 4 and all(html.escape(caption) in page for caption in predictions.values())
    # the corpus scores printed are the means of the per-image scores shown (as CIDEr and CLIPScore define them)
    with open(out / "scores.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(row["stem"] for row in rows) == sorted(predictions)
    for name, column in (("CIDEr", "cider"), ("CLIPScore", "clipscore")):
        assert f"{name} {sum(float(row[column]) for row in rows) / len(rows):.4f}" in output
    assert "http" not in page.replace("http-equiv", "")  # nothing from elsewhere


def test_the_browser_loads_every_image_and_shows_every_row(run_report, tiny_runs):
    out, _ = run_report
    root, _ = tiny_runs
    seen = rendered(out)
    assert len(seen["images"]) == 1 + 2 + 4  # curves, best and worst attention maps, the gallery
    assert all(image["loaded"] for image in seen["images"]), seen["images"]
    config_rows = len(flatten(read_yaml((root / "lora" / "config.yaml").read_text())))
    assert seen["tables"]["gallery-table"] == 4 and seen["tables"]["config-table"] == config_rows
    assert seen["tables"]["parameter-table"] >= 3  # the parts and the total
    assert seen["sorted_cider"] == sorted(seen["sorted_cider"])
    # the check can fail: a missing image is seen as not loaded
    broken = out.parent / "broken"
    shutil.copytree(out, broken)
    (broken / "images" / "00002.jpg").unlink()
    failed = [image["src"] for image in rendered(broken)["images"] if not image["loaded"]]
    assert failed == ["images/00002.jpg"]


def test_report_of_a_prediction_file_alone_escapes_every_text(tmp_path, small_synthetic):
    stems = [p.stem for p in sorted((small_synthetic / "images_val").iterdir())]
    hostile = '<img src="x" onerror="alert(1)"> & </td>'
    predictions = {stem: (hostile if i == 0 else f"a caption {i}") for i, stem in enumerate(stems)}
    (tmp_path / "pred.json").write_text(json.dumps(predictions))
    out = tmp_path / "zero-shot"
    result = vlcap_cli("report", "--predictions", tmp_path / "pred.json", "--images", small_synthetic / "images_val",
                       "--annotations", small_synthetic / "val.json", "--out", out, "--no-clipscore", "--top", 1)
    assert result.exit_code == 0, result.output
    page = (out / "index.html").read_text()
    assert hostile not in page and html.escape(hostile) in page
    assert "no checkpoint: attention maps need one" in page and not (out / "attention").exists()
    seen = rendered(out)
    assert all(image["loaded"] for image in seen["images"]) and len(seen["images"]) == 2 + len(stems)
    assert seen["tables"] == {"gallery-table": len(stems)}


@pytest.mark.parametrize("case, message", [
    ("nothing", "nothing to report: pass a RUN_DIR"),
    ("occupied", "exists and is not an earlier vlcap report"),
    ("missing_key", "annotated image(s) have no prediction"),
])
def test_bad_report_input_is_one_line_and_writes_nothing(tmp_path, small_synthetic, case, message):
    out = tmp_path / "report"
    args = ["--images", small_synthetic / "images_val", "--annotations", small_synthetic / "val.json",
            "--out", out, "--no-clipscore"]
    if case != "nothing":
        (tmp_path / "pred.json").write_text(json.dumps({"only_one": "a caption"}))
        args += ["--predictions", tmp_path / "pred.json"]
    if case == "occupied":
        out.mkdir()
        (out / "thesis.tex").write_text("mine")
    result = vlcap_cli("report", *args)
    assert result.exit_code == 1 and message in result.output and len(result.output.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == (["pred.json"] if case != "nothing" else []) + \
        (["report"] if case == "occupied" else [])
