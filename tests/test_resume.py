"""Resumable training: a run stopped by SIGTERM mid-epoch and resumed ends bit-exactly where an
uninterrupted run with the same seed ends (on CPU)."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import data_overrides, vlcap_cli
from vlcap.core.config import resolve
from vlcap.core.errors import VlcapError
from vlcap.core.train.resume import load_state, state_path


def run(*args):
    return vlcap_cli(*args)


def train_args(data, out, *extra):
    # 40 captions / batch 8 = 5 steps per epoch, 2 epochs; LoRA dropout draws from the RNG that must resume too.
    return ["train", "--preset", "tiny", "--peft", "lora", "--train-json", data / "train.json",
            "--train-images", data / "images_train", "--val-json", data / "val.json", "--val-images",
            data / "images_val", "--out", out, "--epochs", 2, "--batch-size", 8,
            *extra]


def test_sigterm_mid_epoch_then_resume_matches_an_uninterrupted_run(tmp_path, small_synthetic):
    reference = tmp_path / "reference"
    assert run(*train_args(small_synthetic, reference)).exit_code == 0

    out = tmp_path / "interrupted"
    # Loads images in a worker process, to show the data order does not depend on the loader.
    args = train_args(small_synthetic, out, "--set", "train.save_every=1", "--set", "train.num_workers=1")
    process = subprocess.Popen([sys.executable, "-m", "vlcap", *map(str, args)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "COLUMNS": "200"})
    deadline = time.monotonic() + 120
    while not state_path(out).exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 1, stderr
    assert "Traceback" not in stderr and f"vlcap train --resume {out}" in stderr
    state = load_state(out)
    assert state["epoch"] == 0 and 0 < state["batches"] < 5 and state["step"] == state["batches"]
    assert f"stopped by SIGTERM at step {state['step']} of 10" in stderr

    result = run("train", "--resume", out)
    assert result.exit_code == 0, result.output
    final, expected = load_file(out / "last.safetensors"), load_file(reference / "last.safetensors")
    assert final.keys() == expected.keys() and all(torch.equal(final[k], expected[k]) for k in final)
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert history == [json.loads(line) for line in (reference / "history.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in history] == [1, 2]

    again = run("train", "--resume", out)
    assert again.exit_code == 1 and "already finished (10 of 10 steps)" in again.output


def test_resume_refuses_conflicting_options_and_foreign_folders(tmp_path):
    result = run("train", "--resume", tmp_path, "--lr", 1, "--set", "train.seed=3")
    assert result.exit_code == 1 and "drop --lr, --set" in result.output
    result = run("train", "--resume", tmp_path)
    assert result.exit_code == 1 and "no config.yaml here" in result.output


class Payload:
    def __reduce__(self):
        return (print, ("pickled code ran",))


@pytest.mark.parametrize("content", [b"junk", "pickle"])
def test_damaged_or_hostile_resume_state_is_refused(tmp_path, capsys, content):
    state_path(tmp_path).parent.mkdir()
    if content == "pickle":
        torch.save({"step": 3, "x": Payload()}, state_path(tmp_path))
    else:
        state_path(tmp_path).write_bytes(content)
    with pytest.raises(VlcapError, match="damaged resume state"):
        load_state(tmp_path)
    assert "pickled code ran" not in capsys.readouterr().out


def test_a_kill_during_the_last_validation_is_resumable(tmp_path, small_synthetic, registry, monkeypatch):
    from vlcap.core.train import trainer
    out = tmp_path / "run"
    cfg = resolve("tiny", overrides=[data_overrides(small_synthetic), {
        "train": {"epochs": 1, "batch_size": 8, "save_every": 1, "metrics": []}}])

    def killed(self):
        raise KeyboardInterrupt  # what a kill leaves: the final step's resume state, no checkpoints
    with monkeypatch.context() as patch:
        patch.setattr(trainer.Trainer, "validate", killed)
        with pytest.raises(KeyboardInterrupt):
            trainer.train(cfg, out, registry)
    assert load_state(out)["step"] == 5 and not (out / "last.safetensors").exists()

    result = run("train", "--resume", out)
    assert result.exit_code == 0, result.output
    assert (out / "last.safetensors").exists() and (out / "best.safetensors").exists()
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["step"]) for r in history] == [(1, 5)] and "val_loss" in history[0]
    assert "already finished (5 of 5 steps)" in run("train", "--resume", out).output
