"""Nothing printed can crash the console or take it over: names, captions, paths and messages are
printed as text (never rich markup) with control characters escaped."""
import io

from rich.console import Console

from conftest import vlcap_cli
from vlcap.core.console import safe, say, text

HOSTILE = "[/] [bold]kept[/bold] [red] \x1b[2J\x1b]0;title\x07 \u202eevil \udcff end"


def test_say_prints_markup_and_control_characters_as_visible_text():
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=300)
    say(console, f"file {HOSTILE}", style="yellow")
    console.print(text(HOSTILE))
    printed = out.getvalue()
    assert printed.count("[/] [bold]kept[/bold] [red]") == 2  # nothing swallowed as markup
    assert "\x1b[2J" not in printed and "\x07" not in printed and "\u202e" not in printed
    assert "\\x1b[2J" in printed and "\\x07" in printed and "\\u202e" in printed and "\\udcff" in printed
    printed.encode("utf-8")  # a lone surrogate would not encode


def test_safe_keeps_ordinary_text_and_line_structure():
    assert safe("a dog on a café terrace\tand\na cat") == "a dog on a café terrace\tand\na cat"


def test_cli_errors_escape_control_characters(tmp_path):
    result = vlcap_cli("inspect", tmp_path / "x\x1b]0;pwned\x07[/].safetensors")
    assert result.exit_code != 0
    assert "\x1b" not in result.output and "\x07" not in result.output
    assert "\\x1b]0;pwned\\x07[/].safetensors: checkpoint not found" in result.output


def test_markup_in_every_printed_path_and_name(tmp_path, small_synthetic, run_dir, capsys):
    from types import SimpleNamespace
    from vlcap import cli
    run = tmp_path / "runs[" / "]run[bold]"  # "[/]" across the separator: a closing tag to rich
    cli.print_training(SimpleNamespace(steps=1, saved=10, best_checkpoint=run / "best.safetensors",
                                       last_checkpoint=run / "last.safetensors"))
    assert f"saved to {run}/best.safetensors (best)" in capsys.readouterr().out
    images = tmp_path / "[red]images[" / "]"
    images.mkdir(parents=True)
    source = sorted((small_synthetic / "images_val").iterdir())[0]
    (images / "[bold]dog[x].png").write_bytes(source.read_bytes())
    out = tmp_path / "out[" / "]pred.json"
    result = vlcap_cli("caption", images, "--checkpoint", run_dir / "best.safetensors", "--out", out)
    assert result.exit_code == 0, result.output
    assert f"wrote 1 captions to {out}" in result.output
