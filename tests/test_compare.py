"""vlcap compare: one row per run as the run directories record it, best first, with curves."""
import csv
import json

import pytest
from PIL import Image

from conftest import vlcap_cli

ORDER = ("lora", "adapter", "interrupted", "unstarted")


def compare_json(root, *args):
    result = vlcap_cli("compare", *(root / name for name in ORDER), "--json", *args)
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_runs_sorted_by_the_selection_metric_with_interrupted_and_unstarted_runs_kept(tiny_runs):
    root, trained = tiny_runs
    report = compare_json(root)
    assert report["sorted_by"] == "val_loss"  # two of the three runs that chose select by it
    rows = {row["run"].rsplit("/", 1)[-1]: row for row in report["runs"]}
    order = [row["run"].rsplit("/", 1)[-1] for row in report["runs"]]
    best_loss = {name: min(r["val_loss"] for r in trained[name].history) for name in ("lora", "adapter")}
    best_loss["interrupted"] = trained["lora"].history[0]["val_loss"]
    assert order[:3] == sorted(best_loss, key=best_loss.get) and order[3] == "unstarted"
    assert [row["best"] for row in report["runs"]] == [True, False, False, False]
    for name, value in best_loss.items():
        assert rows[name]["val_loss"] == pytest.approx(value)
    assert rows["interrupted"]["status"] == "interrupted (1/2 epochs)" and rows["interrupted"]["epochs"] == 1
    assert rows["unstarted"]["status"] == "no epoch finished" and rows["unstarted"]["best_epoch"] is None
    assert rows["lora"]["status"] == rows["adapter"]["status"] == "finished"
    # the adapter run also recorded CIDEr: a column for everyone, empty where it was not recorded
    assert rows["adapter"]["cider"] >= 0 and rows["lora"]["cider"] is None
    assert rows["lora"]["peft"] == "lora r=4" and rows["adapter"]["peft"] == "adapter"
    assert rows["lora"]["connector"] == "cross-attention" and rows["lora"]["encoder"] == "test_vit"
    assert rows["lora"]["trainable"] == trained["lora"].trainable
    assert rows["adapter"]["checkpoint_bytes"] == (root / "adapter" / "best.safetensors").stat().st_size
    assert rows["lora"]["seconds_per_epoch"] > 0 and rows["lora"]["samples_per_s"] > 0


def test_by_another_metric_the_runs_that_recorded_it_come_first(tiny_runs):
    root, trained = tiny_runs
    rows = compare_json(root, "--by", "cider")["runs"]
    assert rows[0]["run"].endswith("adapter") and rows[0]["best"]
    assert rows[0]["cider"] == pytest.approx(max(r["cider"] for r in trained["adapter"].history))
    bad = vlcap_cli("compare", root / "lora", "--by", "bleu")
    assert bad.exit_code == 1 and "--by bleu: none of the runs recorded it" in bad.output


def test_table_csv_and_curves(tiny_runs, tmp_path):
    root, _ = tiny_runs
    result = vlcap_cli("compare", *(root / name for name in ORDER), "--csv", tmp_path / "runs.csv",
                       "--plot", tmp_path / "curves.png", env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("│")]  # the table's rows
    assert "4 runs by val_loss" in result.output and "★" in lines[0] and not any("★" in line for line in lines[1:])
    assert any("interrupted (1/2 epochs)" in line for line in lines) and "no epoch finished" in result.output
    with open(tmp_path / "runs.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and {"cider", "val_loss", "seconds_per_epoch", "samples_per_s"} <= set(rows[0])
    with Image.open(tmp_path / "curves.png") as image:
        assert image.format == "PNG" and image.width > 600


@pytest.mark.parametrize("case, message", [
    ("missing", "run directory not found"),
    ("not_a_run", "not a vlcap run directory (no config.yaml)"),
    ("bad_yaml", "config.yaml: not a readable YAML config"),
    ("bad_history", "history.jsonl:2: not a JSON record"),
    ("odd_record", "history.jsonl:1: a history record is a JSON object with an integer epoch"),
])
def test_bad_run_directories_are_one_line(tmp_path, tiny_runs, case, message):
    root, _ = tiny_runs
    run = tmp_path / "run"
    if case != "missing":
        run.mkdir()
    if case in ("bad_yaml", "bad_history", "odd_record"):
        (run / "config.yaml").write_text((root / "lora" / "config.yaml").read_text() if case != "bad_yaml" else "a: [")
    if case == "bad_history":
        (run / "history.jsonl").write_text('{"epoch": 1, "train_loss": 1.0}\n{"epoch": 2,\n')
    if case == "odd_record":
        (run / "history.jsonl").write_text('{"epoch": "one", "train_loss": 1.0}\n')
    result = vlcap_cli("compare", run, "--plot", tmp_path / "curves.png")
    assert result.exit_code == 1 and message in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "curves.png").exists()
