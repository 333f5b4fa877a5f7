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
    cider = SimpleNamespace(score=0.5)
    evaluation = SimpleNamespace(cider=cider, clipscore=None, images=1, clip_model=None)
    result = SimpleNamespace(evaluation=evaluation, rows=[{"stem": "img[1]", "cider": 0.5, "caption": "a [red] car"}])
    text = rendered(reports.evaluation_tables(result, "pred.json", "val.json", top_k=1))
    assert "img[1]" in text and "a [red] car" in text


def test_truncation_warning_escapes_the_stems():
    clip = SimpleNamespace(truncated=["long[b]"], score=0.1)
    result = SimpleNamespace(evaluation=SimpleNamespace(clipscore=clip))
    assert "long[b]" in rendered(reports.truncation_warning(result))
