"""What the ``vlcap`` commands print, in one place: their terminal tables and JSON documents.

Each function takes a command's result and returns a rich renderable (a ``Table``, a
``Group`` of tables and lines, or a line of ``Text``), or a JSON-ready dict; the command prints
it on its own console. Nothing here computes a result or touches a file. Names and values that
come from users, files or plugins go in as ``text`` (``vlcap.core.console``: never parsed as markup, so a ``[x]`` in a
name stays, and control characters escaped).
"""
import json

from rich.console import Group
from rich.table import Table
from rich.text import Text

from vlcap.core.console import text

from vlcap.core.errors import few


def _table(title, columns, right=(), **options):
    """A table with ``columns``, those in ``right`` right-justified."""
    table = Table(title=text(title), **options)
    for column in columns:
        table.add_column(column, justify="right" if column in right else "left")
    return table


def plugins_table(entries, failed):
    """``vlcap list-plugins``: one row per installed plugin, then one per module that failed."""
    table = _table("vlcap plugins", ("name", "kind", "package", "version", "description"))
    for e in entries:
        table.add_row(text(e.name), e.kind, text(e.package), text(e.version), text(e.description))
    for m in failed:
        table.add_row(text(m.entry_point), text("failed", style="red"), text(m.package), text(m.version),
                      text(f"skipped: {m.error}"))
    return table


def option_default(option):
    """A ``PluginOption``'s default as ``--set`` takes it: JSON, which is YAML (``null``,
    ``["q", "v"]``, ``"all"``), so it can be pasted as a value."""
    return "(required)" if option.required else json.dumps(option.default, default=repr)


def plugin_options_table(entries):
    """``vlcap list-plugins --options``: one row per option of each plugin (name, type,
    default); a plugin without options gets one row saying so."""
    table = _table("vlcap plugin options (decoding: --set NAME=VALUE; peft: --set peft.options.NAME=VALUE; "
                   "connector: --set connector.options.NAME=VALUE; metric: evaluate --set METRIC.NAME=VALUE)",
                   ("plugin", "kind", "option", "type", "default"))
    for column in table.columns:
        column.overflow = "fold"  # an option's name is what users type: never cut to an ellipsis
    for e in entries:
        options = e.options()
        if not options:
            table.add_row(text(e.name), e.kind, text("(no options)", style="dim"), "", "")
        for option in options:
            table.add_row(text(e.name), e.kind, text(option.name), text(option.type), text(option_default(option)))
    return table


def plugin_options_json(entries):
    """``vlcap list-plugins --options --json``: each plugin's entry with its ``options``."""
    return [{**e.as_dict(), "options": [option.as_dict() for option in e.options()]} for e in entries]


def plugin_modules_table(modules):
    """``vlcap list-plugins --hooks``: each plugin module, its package and the hooks it implements."""
    table = Table(title="vlcap plugin modules")
    for column in ("entry point", "module", "package", "version", "hooks"):
        table.add_column(column, overflow="fold")
    for m in modules:
        table.add_row(text(m.entry_point), text(m.module), text(m.package), text(m.version),
                      text(f"failed: {m.error}", style="red") if m.error else text("\n".join(m.hooks)))
    return table


def parameter_table(counts, title):
    """Trainable and frozen parameters per part of the captioner (a ``ParameterCount``), and the total."""
    table = _table(title, ("part", "trainable", "frozen"), right=("trainable", "frozen"))
    for group, (trainable, frozen) in sorted(counts.groups.items()):
        table.add_row(text(group), f"{trainable:,}", f"{frozen:,}")
    table.add_row(text("total", style="bold"), text(f"{counts.trainable:,}", style="bold"), f"{counts.frozen:,}")
    return table


def parameter_report(counts, title, budget):
    """``vlcap train --dry-run``: the parameter table and the trainable count against ``budget``."""
    return Group(parameter_table(counts, title), text(f"trainable: {counts.trainable:,} of the {budget:,} budget"))


def checkpoint_report(summary):
    """``vlcap inspect``: the checkpoint's metadata (a ``CheckpointSummary``), how it was saved
    (``saved_at_rows``), then its parameters per part of the captioner. Every value is ``Text``:
    paths and names in a file are not markup."""
    if "classes" in summary.metadata:
        return classifier_checkpoint_report(summary)
    meta, cfg = summary.metadata, summary.metadata["config"]
    peft, connector = meta["peft"], meta["connector"]
    rows = [("format", meta["format"]), ("vlcap", meta.get("vlcap_version", "")),
            ("connector", plugin_text(connector)),
            ("connector options", json.dumps(cfg.get("connector", {}).get("options", {}))),
            ("peft", plugin_text(peft)),
            ("peft options", json.dumps(cfg["peft"]["options"])), ("encoder", meta["encoder"]),
            ("encoder features", encoder_features(meta)),
            ("decoder", json.dumps(cfg["model"]["decoder"])), ("decoder weights", str(cfg["model"]["decoder_weights"])),
            ("tokenizer", meta["tokenizer"]), ("parameters", f"{meta['parameters']:,}"),
            ("tensors", str(len(summary.shapes))), *trained_pretrained_rows(meta),
            *saved_at_rows(meta.get("training"))]
    table = Table(title=text(summary.path), show_header=False)
    for key, value in rows:
        table.add_row(text(key), text(value))
    return Group(table, *(text(f"  {group}: {count:,}") for group, count in sorted(summary.groups.items())))


def trained_pretrained_rows(metadata):
    """The pretrained decoder tensors the method trained (its ``pretrained_to_train``), which
    loading puts over the decoder weights' values; no row when there are none."""
    names = metadata.get("trained_pretrained")
    if not names:
        return []
    return [("trained pretrained", f"{len(names)} tensor(s): {few(names, 3)}")]


def classifier_checkpoint_report(summary):
    """``vlcap inspect`` of a ``vlcap train-classifier`` checkpoint."""
    meta, model, train = summary.metadata, summary.metadata["config"]["model"], summary.metadata["config"]["train"]
    method = model["method"] + (f" (rank {model['lora_rank']}, alpha {model['lora_alpha']})"
                                if model["method"] == "lora" else "")
    classes = meta["classes"]
    rows = [("format", meta["format"]), ("vlcap", meta.get("vlcap_version", "")),
            ("encoder", f"{model['encoder']} ({'pretrained' if model['pretrained'] else 'random init'})"),
            ("image size", str(model["img_size"] or "the model's")), ("method", method),
            ("optimizer", train["optimizer"]), ("classes", f"{len(classes)}: {', '.join(classes[:8])}"
                                                          f"{', ...' if len(classes) > 8 else ''}"),
            ("parameters", f"{meta['parameters']:,}"), ("tensors", str(len(summary.shapes))),
            *saved_at_rows(meta.get("training"))]
    table = Table(title=text(summary.path), show_header=False)
    for key, value in rows:
        table.add_row(text(key), text(value))
    return Group(table, *(text(f"  {group}: {count:,}") for group, count in sorted(summary.groups.items())))


def plugin_text(record):
    """A plugin a checkpoint needs: "lora (vlcap 0.1.0)"; a record without a version is one a
    checkpoint older than it implies (the connector: cross-attention, then the only design)."""
    if not record["version"]:
        return f"{record['name']} (not recorded: the only design when the checkpoint was written)"
    return f"{record['name']} ({record['package']} {record['version']})"


def encoder_features(metadata):
    """The feature tokens the encoder gave when the checkpoint was saved ("257 tokens of width
    1024"); "not recorded" for checkpoints written before they were kept."""
    if "encoder_tokens" not in metadata or "encoder_width" not in metadata:
        return "not recorded"
    return f"{metadata['encoder_tokens']:,} tokens of width {metadata['encoder_width']:,}"


def saved_at_rows(training):
    """``(key, value)`` rows for the history record a checkpoint was saved at: "epoch E, step S",
    then each loss and validation score under its own name. A checkpoint written before the
    record was kept (``training`` None) gets one "not recorded" row."""
    if training is None:
        return [("saved at", "not recorded")]
    position = ", ".join(f"{key} {training[key]}" for key in ("epoch", "step") if key in training)
    rows = [("saved at", position or "not recorded")]
    for name, value in training.items():
        if name not in ("epoch", "step"):
            rows.append((name, f"{value:.4f}" if isinstance(value, float) else str(value)))
    return rows


def classification_table(result):
    """``vlcap classify --report``: each template's accuracy (a ``Classification``'s ``report``)."""
    table = _table(f"zero-shot accuracy, {result.clip_name}, {len(result.files)} images",
                   ("template", "accuracy", "correct"), right=("accuracy", "correct"))
    for row in result.report:
        table.add_row(text(row.template), f"{100 * row.correct / row.total:.2f}%", f"{row.correct}/{row.total}")
    return table


def evaluation_tables(result, pred_path, annotations_path, top_k):
    """``vlcap evaluate``: the scores of ``pred_path`` against ``annotations_path`` (a
    ``ScoredPredictions``), one row per metric, then the ``top_k`` best and worst images by the
    metric they are ranked by."""
    evaluation = result.evaluation
    title = f"{pred_path} against {annotations_path} ({evaluation.images:,} images)"
    table = _table(title, ("metric", "score", "how"), right=("score",))
    for name, scores in evaluation.scores.items():
        table.add_row(text(metric_title(evaluation, name)), f"{scores.score:.4f}",
                      text(evaluation.metrics[name].description))
    tables = [table]
    if top_k:
        by = metric_title(evaluation, result.rank_by)
        scores = result.columns[2:]
        for ranked_title, chosen in ((f"top {top_k} by {by}", result.rows[:top_k]),
                                     (f"bottom {top_k} by {by}", result.rows[::-1][:top_k])):
            ranked = _table(ranked_title, ("image", *scores, "caption"), right=scores)
            for row in chosen:
                ranked.add_row(text(row["stem"]), *(f"{row[k]:.4f}" for k in scores), text(row["caption"]))
            tables.append(ranked)
    return Group(*tables)


def metric_title(evaluation, name):
    return evaluation.metrics[name].title or name


def evaluation_json(result):
    """``vlcap evaluate --json``: the number of images, each metric's corpus score under its name,
    and each metric's ``details`` (e.g. ``clip_model``, ``truncated``) beside them; ``metrics``
    holds the same per metric, with its notes."""
    evaluation = result.evaluation
    out = {"images": evaluation.images}
    for name, scores in evaluation.scores.items():
        out[name] = scores.score
    for scores in evaluation.scores.values():
        out.update({key: value for key, value in scores.details.items() if key not in out})
    out["metrics"] = {name: {"score": scores.score, "higher_is_better": evaluation.metrics[name].higher_is_better,
                             "details": scores.details, "notes": scores.notes}
                      for name, scores in evaluation.scores.items()}
    return out


def evaluation_notes(result):
    """The metrics' notes (e.g. captions CLIP had to truncate), one yellow ``Text`` line each."""
    return [text(note, style="yellow") for scores in result.evaluation.scores.values() for note in scores.notes]


def checkpoint_json(summary):
    """``vlcap inspect --json``: a ``CheckpointSummary``'s metadata and its tensors' shapes."""
    return {**summary.metadata, "tensors": {k: list(v) for k, v in sorted(summary.shapes.items())}}


def _number(value, spec):
    """``value`` formatted with ``spec``; an em dash for a value not recorded."""
    return "—" if value is None else format(value, spec)


def megabytes(size):
    return "—" if size is None else f"{size / 1e6:.2f} MB" if size >= 1e5 else f"{size / 1e3:.1f} kB"


def runs_table(comparison, rows):
    """``vlcap compare``: one row per run (``compare.comparison_rows``), best first, the best
    marked; scores are those of each run's best epoch; — where a run did not record a value."""
    scores = ("val_loss", *comparison.metrics)
    columns = ("", "run", "status", "connector", "peft", "encoder", "trainable", "checkpoint", "epochs",
               "best epoch", *scores, "s/epoch", "samples/s")
    right = ("trainable", "checkpoint", "epochs", "best epoch", *scores, "s/epoch", "samples/s")
    table = _table(f"{len(rows)} runs by {comparison.metric} (scores at each run's best epoch)", columns,
                   right=right)
    for column in table.columns:
        column.overflow = "fold"  # a narrow terminal wraps a run's name or options, never cuts them
    for row in rows:
        epochs = f"{row['epochs']}/{_number(row['planned_epochs'], '')}"
        best_epoch = _number(row["best_epoch"], "")
        if row["best_epoch"] is not None and row["selected_by"] != comparison.metric:
            best_epoch += f" (by {row['selected_by']})"
        status = Text(row["status"], style="" if row["status"] == "finished" else "yellow")
        table.add_row("★" if row["best"] else "", Text(row["run"]), status, Text(row["connector"]),
                      Text(row["peft"]), Text(row["encoder"]), _number(row["trainable"], ","),
                      megabytes(row["checkpoint_bytes"]), epochs, best_epoch,
                      *(_number(row[key], ".4f") for key in scores), _number(row["seconds_per_epoch"], ".1f"),
                      _number(row["samples_per_s"], ".1f"))
    return table


def presets_table(rows, budget):
    """``vlcap presets``: each preset (``training.preset_summaries``) with its trainable parameters."""
    table = _table(f"vlcap presets (vlcap train --preset NAME; trainable budget {budget:,})",
                   ("preset", "encoder", "connector", "peft", "decoding", "trainable", "what it is"),
                   right=("trainable",))
    for column in table.columns:
        column.overflow = "fold"
    for row in rows:
        table.add_row(Text(row["name"]), Text(row["encoder"]), Text(row["connector"]), Text(row["peft"]),
                      Text(row["decoding"]),
                      _number(row["trainable"], ","), Text(row["note"]))
    return table


def comparison_table(comparison):
    """``vlcap caption --hf-model`` with several settings or ``--report``: one row per setting
    (CIDEr and CLIPScore when scored, the best of each in bold; its generation options and
    prompt, never cut), then where the files are."""
    scored = comparison.clip_model is not None
    title = f"{comparison.model}: {len(comparison.results)} setting(s) on {comparison.images:,} images"
    if scored:
        title += f", CLIPScore with CLIP {comparison.clip_model}"
    scores = ("CIDEr", "CLIPScore") if scored else ()
    table = _table(title, ("setting", *scores, "captions", "generation", "prompt"), right=(*scores, "captions"))
    for column in table.columns[-2:]:
        column.overflow = "fold"
    best = {name: max((getattr(r, name) for r in comparison.results), default=None) for name in ("cider", "clipscore")}
    for r in comparison.results:
        cells = [text(f"{getattr(r, name):.4f}", style="bold" if getattr(r, name) == best[name] else None)
                 for name in ("cider", "clipscore")] if scored else []
        table.add_row(text(r.setting.name), *cells, str(r.captions), text(r.setting.generation.replace(" ", "\n")),
                      text(r.setting.prompt))
    files = f"predictions: {comparison.out_dir}/setting-N.json; settings: {comparison.out_dir}/settings.json"
    if scored:
        files += f"; scores: {comparison.out_dir}/report.json, report.csv"
    return Group(table, text(files))
