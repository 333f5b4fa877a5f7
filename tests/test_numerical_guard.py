"""A NaN/inf loss or gradient stops the run naming the step and batch, and never overwrites the
last good resume state or checkpoint with non-finite weights."""
import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from conftest import data_overrides, tiny_config
from vlcap.cli import main
from vlcap.core.model.captioner import Captioner
from vlcap.core.train.resume import load_state
from vlcap.core.train.trainer import NonFinite, train


class InfiniteGradient(torch.autograd.Function):
    """Identity forward (a finite loss), infinite gradient backward."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def break_loss_at(monkeypatch, call, breaker):
    original, calls = Captioner.loss, []

    def loss(self, *args):
        calls.append(self.training)  # validation batches call loss too, in eval mode
        value = original(self, *args)
        return breaker(value) if self.training and sum(calls) == call else value

    monkeypatch.setattr(Captioner, "loss", loss)


@pytest.mark.parametrize("breaker, message", [
    (lambda loss: loss * float("nan"), r"loss became nan at step 3 \(epoch 2, batch 1\)"),
    (InfiniteGradient.apply, r"gradient norm became (inf|nan) at step 3 \(epoch 2, batch 1\)"),
])
def test_non_finite_step_stops_and_keeps_the_last_good_state(tmp_path, registry, small_synthetic, monkeypatch,
                                                             breaker, message):
    cfg = tiny_config("adapter", **data_overrides(small_synthetic), train={"epochs": 2, "batch_size": 20, "save_every": 1})
    run_dir = tmp_path / "run"
    break_loss_at(monkeypatch, 3, breaker)  # 2 steps per epoch
    with pytest.raises(NonFinite, match=message) as error:
        train(cfg, run_dir, registry)
    assert f"the last good state is {run_dir / 'resume/state.pt'}" in str(error.value)
    state = load_state(run_dir)
    assert state["step"] == 2 and all(torch.isfinite(t).all() for t in state["trainable"].values())
    last = load_file(run_dir / "last.safetensors")  # from the end of epoch 1
    assert all(torch.isfinite(t).all() for t in last.values())

    monkeypatch.undo()
    # the advice is a command that works: resume with a lower learning rate
    advice = str(error.value).split("continue with a lower learning rate: vlcap ")[1].split()
    assert advice == ["train", "--resume", str(run_dir), "--lr", f"{cfg.train.lr / 10:g}"]
    result = CliRunner().invoke(main, advice)
    assert result.exit_code == 0, result.output
    assert f"lr: {cfg.train.lr / 10}" in (run_dir / "config.yaml").read_text()
    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["step"]) for r in history] == [(1, 2), (2, 4)]
    refused = CliRunner().invoke(main, ["train", "--resume", str(run_dir), "--lr", "-1"])
    assert refused.output.strip().endswith("train.lr = -1.0: expected a finite number > 0")


def test_absurd_learning_rate_fails_in_one_line(tmp_path, small_synthetic):
    d = small_synthetic
    result = CliRunner().invoke(main, [str(a) for a in (
        "train", "--preset", "tiny", "--train-json", d / "train.json", "--train-images", d / "images_train",
        "--out", tmp_path / "run", "--lr", 1e6, "--max-steps", 5, "--set", "train.warmup_steps=0")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "became" in result.output and "lower train.lr (e.g. --lr 100000)" in result.output, result.output

