"""The terminal tables print names, file stems and captions as text: a ``[x]`` is not markup."""
from types import SimpleNamespace

from rich.console import Console

from vlcap.apps import reports
from vlcap.core.plugins import PluginEntry, PluginModule


def rendered(renderable):
    console = Console(record=True, width=200)
    console.print(renderable)
    return console.export_text()


def test_plugin_table_keeps_brackets_in_names():
    entry = PluginEntry("odd[x]", "peft", "pkg[y]", "1", "does [bold]this", object())
    failed = PluginModule("bad[z]", "mod", "pkg", "1", error="boom [i]")
    text = rendered(reports.plugins_table([entry], [failed]))
    for shown in ("odd[x]", "pkg[y]", "does [bold]this", "bad[z]", "skipped: boom [i]", "failed"):
        assert shown in text


def test_evaluation_tables_keep_brackets_in_stems_and_captions():
    from vlcap.core.eval.metrics import MetricScores
    metric = SimpleNamespace(title="CIDEr[x]", description="scores [bold]captions", higher_is_better=True)
    evaluation = SimpleNamespace(scores={"cider": MetricScores(0.5, {"img[1]": 0.5})}, metrics={"cider": metric},
                                 images=1)
    result = SimpleNamespace(evaluation=evaluation, rank_by="cider", columns=("stem", "caption", "cider"),
                             rows=[{"stem": "img[1]", "cider": 0.5, "caption": "a [red] car"}])
    text = rendered(reports.evaluation_tables(result, "pred.json", "val.json", top_k=1))
    for shown in ("img[1]", "a [red] car", "CIDEr[x]", "scores [bold]captions"):
        assert shown in text


def test_metric_notes_escape_the_stems():
    from vlcap.core.eval.metrics import MetricScores
    scores = MetricScores(0.1, {}, notes=["1 caption(s) longer than CLIP's 77 tokens were truncated: long[b]"])
    result = SimpleNamespace(evaluation=SimpleNamespace(scores={"clipscore": scores}))
    assert all("long[b]" in rendered(note) for note in reports.evaluation_notes(result))
