"""`vlcap inspect`: what a checkpoint holds and how it was saved."""
import json

from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import vlcap_cli


def report_rows(output):
    """The inspect table's rows as {key: value}."""
    rows = [[cell.strip() for cell in line.split("│")[1:-1]] for line in output.splitlines() if line.count("│") == 3]
    return {key: value for key, value in rows}


def rewritten(source, target, **changes):
    """A copy of checkpoint ``source`` at ``target`` with metadata keys changed (None: removed)."""
    with safe_open(str(source), framework="pt") as f:
        metadata = dict(f.metadata())
    for key, value in changes.items():
        if value is None:
            metadata.pop(key, None)
        else:
            metadata[key] = value
    save_file(load_file(source), target, metadata=metadata)
    return target


def test_inspect_shows_the_step_epoch_scores_and_encoder_features(tmp_path, run_dir):
    record = {"epoch": 3, "step": 12, "train_loss": 2.5, "val_loss": 2.75, "cider": 0.125}
    ckpt = rewritten(run_dir / "best.safetensors", tmp_path / "scored.safetensors", training=json.dumps(record))
    result = vlcap_cli("inspect", ckpt)
    assert result.exit_code == 0, result.output
    rows = report_rows(result.output)
    assert rows["saved at"] == "epoch 3, step 12"
    assert (rows["train_loss"], rows["val_loss"], rows["cider"]) == ("2.5000", "2.7500", "0.1250")
    metadata = json.loads(vlcap_cli("inspect", ckpt, "--json").output)
    assert metadata["training"] == record
    assert rows["encoder features"] == f"{metadata['encoder_tokens']:,} tokens of width {metadata['encoder_width']:,}"


def test_inspect_of_a_trained_run_shows_its_record(run_dir):
    rows = report_rows(vlcap_cli("inspect", run_dir / "best.safetensors").output)
    assert rows["saved at"].startswith("epoch 1, step 2") and "train_loss" in rows


def test_inspect_of_an_older_checkpoint_says_not_recorded(tmp_path, run_dir):
    ckpt = rewritten(run_dir / "best.safetensors", tmp_path / "old.safetensors",
                     training=None, encoder_width=None, encoder_tokens=None)
    result = vlcap_cli("inspect", ckpt)
    assert result.exit_code == 0, result.output
    rows = report_rows(result.output)
    assert rows["saved at"] == "not recorded" and rows["encoder features"] == "not recorded"
    assert "train_loss" not in rows


def test_inspect_prints_names_as_text(tmp_path, run_dir):
    ckpt = rewritten(run_dir / "best.safetensors", tmp_path / "[x]ckpt.safetensors", encoder="vit[bold]")
    result = vlcap_cli("inspect", ckpt)
    assert result.exit_code == 0, result.output
    assert "[x]ckpt" in result.output and report_rows(result.output)["encoder"] == "vit[bold]"
