"""Continuing training past a run's planned length (`train --resume RUN --epochs/--max-steps`) and
starting a new run from a checkpoint's trainable weights (`train --init-from CKPT`)."""
import json
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import data_overrides, tiny_config, vlcap_cli
from vlcap.core.errors import VlcapError
from vlcap.core.train import resume as resume_lib
from vlcap.core.train.trainer import Trainer, build_optimizer, build_scheduler


def train_args(data, out, *extra):
    """A tiny run without validation: 40 captions / batch 8 = 5 steps per epoch."""
    return ["train", "--preset", "tiny", "--train-json", data / "train.json", "--train-images",
            data / "images_train", "--out", out, "--batch-size", 8, *extra]


def training_data(root):
    """The data config section of ``train_args``: training split only."""
    return {k: v for k, v in data_overrides(root)["data"].items() if k.startswith("train")}


def history(out):
    return [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]


def saved_train_config(out):
    return yaml.safe_load((out / "config.yaml").read_text())["train"]


def test_a_finished_run_is_extended_by_epochs_then_by_max_steps(tmp_path, small_synthetic):
    out = tmp_path / "run"
    assert vlcap_cli(*train_args(small_synthetic, out, "--peft", "lora", "--epochs", 1)).exit_code == 0
    assert [r["step"] for r in history(out)] == [5]

    result = vlcap_cli("train", "--resume", out, "--epochs", 2)
    assert result.exit_code == 0, result.output
    assert "trained 10 steps" in result.output and [r["step"] for r in history(out)] == [5, 10]
    assert saved_train_config(out)["epochs"] == 2

    result = vlcap_cli("train", "--resume", out, "--epochs", 3, "--max-steps", 12)
    assert result.exit_code == 0, result.output
    assert [r["step"] for r in history(out)] == [5, 10, 12]
    assert (saved_train_config(out)["epochs"], saved_train_config(out)["max_steps"]) == (3, 12)

    finished = vlcap_cli("train", "--resume", out)  # a plain resume keeps the new length
    assert finished.exit_code == 1 and "already finished (12 of 12 steps)" in finished.output
    shorter = vlcap_cli("train", "--resume", out, "--max-steps", 11)
    assert shorter.exit_code == 1 and "already at step 12 of 11" in shorter.output
    assert len(shorter.output.strip().splitlines()) == 1
    assert saved_train_config(out)["max_steps"] == 12  # a refused resume leaves config.yaml alone


def test_a_run_cut_mid_epoch_by_max_steps_is_extended_by_max_steps(tmp_path, small_synthetic):
    out = tmp_path / "run"
    assert vlcap_cli(*train_args(small_synthetic, out, "--peft", "lora", "--max-steps", 3)).exit_code == 0
    result = vlcap_cli("train", "--resume", out, "--max-steps", 14)
    assert result.exit_code == 0, result.output
    # The cut epoch stays closed; the extension trains whole epochs from the next one on.
    assert [r["step"] for r in history(out)] == [3, 8, 13, 14]
    assert saved_train_config(out)["max_steps"] == 14


def test_a_stopped_run_resumes_with_a_new_length(tmp_path, small_synthetic, registry):
    out = tmp_path / "run"
    cfg = tiny_config("lora", data=training_data(small_synthetic), train={"batch_size": 8, "epochs": 1})
    trainer = Trainer(cfg, out, registry)
    with trainer.display:
        trainer.stop_signals = ["SIGTERM"]  # as if a signal came during the first step
        with pytest.raises(VlcapError, match="stopped by SIGTERM at step 1 of 5"):
            trainer.train_epoch(0)
    result = vlcap_cli("train", "--resume", out, "--max-steps", 7, "--epochs", 2)
    assert result.exit_code == 0, result.output
    assert "resumed at step 1" in result.output and [r["step"] for r in history(out)] == [5, 7]


def test_the_learning_rate_follows_the_schedule_replanned_over_the_new_length(tmp_path):
    train_cfg = tiny_config(train={"warmup_steps": 2}).train
    model = torch.nn.Linear(3, 2)
    optimizer = build_optimizer(list(model.parameters()), train_cfg)
    scheduler = build_scheduler(optimizer, 10, train_cfg)
    scheduler.step_update(10)  # finished: the rate is at its minimum
    state = resume_lib.TrainState(epoch=2, step=10)
    resume_lib.save_training(tmp_path, state, list(model.named_parameters()), optimizer, scheduler,
                             torch.amp.GradScaler("cpu", enabled=False))

    longer = build_optimizer(list(model.parameters()), train_cfg)
    longer_scheduler = build_scheduler(longer, 20, train_cfg)
    resume_lib.restore_training(resume_lib.load_state(tmp_path), model, longer, longer_scheduler,
                                torch.amp.GradScaler("cpu", enabled=False), tmp_path)
    planned = build_scheduler(build_optimizer(list(model.parameters()), train_cfg), 20, train_cfg)
    assert longer.param_groups[0]["lr"] == planned._get_lr(10)[0] > optimizer.param_groups[0]["lr"]


@pytest.fixture(scope="module")
def lora_checkpoint(tmp_path_factory, small_synthetic):
    """last.safetensors of a 5-step tiny LoRA run (r=8)."""
    out = tmp_path_factory.mktemp("lora_run")
    assert vlcap_cli(*train_args(small_synthetic, out, "--peft", "lora", "--epochs", 1)).exit_code == 0
    return out / "last.safetensors"


def test_init_from_fills_the_new_runs_trainable_weights_and_is_recorded(tmp_path, small_synthetic, registry,
                                                                         lora_checkpoint):
    checkpoint = shutil.copy(lora_checkpoint, tmp_path / "start.safetensors")
    cfg = tiny_config("lora", data=training_data(small_synthetic),
                      train={"batch_size": 8, "max_steps": 2, "init_from": str(checkpoint)})
    trainer = Trainer(cfg, tmp_path / "built", registry)
    trainable = dict(trainer.named_trainable)
    expected = load_file(checkpoint)
    assert trainable.keys() == expected.keys() and all(torch.equal(trainable[k], expected[k]) for k in expected)
    assert saved_train_config(tmp_path / "built")["init_from"] == str(checkpoint.resolve())

    out = tmp_path / "run"
    result = vlcap_cli(*train_args(small_synthetic, out, "--peft", "lora", "--max-steps", 2,
                                   "--init-from", checkpoint))
    assert result.exit_code == 0, result.output
    assert "(starting from" in result.output
    checkpoint.unlink()  # a resumed run takes its weights from its resume state
    result = vlcap_cli("train", "--resume", out, "--max-steps", 4)
    assert result.exit_code == 0, result.output
    assert [r["step"] for r in history(out)] == [2, 4]


@pytest.mark.parametrize("args, message", [
    (["--peft", "lora", "--set", "peft.options.r=16"],
     "PEFT method lora (r=8) does not match this run's lora (r=16): "),
    (["--peft", "adapter"], "trained with PEFT method 'lora', but this run uses 'adapter'; pass --peft lora"),
])
def test_init_from_a_checkpoint_of_another_form_is_one_line(tmp_path, small_synthetic, lora_checkpoint, args,
                                                            message):
    result = vlcap_cli(*train_args(small_synthetic, tmp_path / "run", "--max-steps", 1, "--init-from",
                                   lora_checkpoint, *args))
    assert result.exit_code == 1 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1
    if "r=16" in message:
        assert "has shape" in result.output and result.output.strip().endswith("--set peft.options.r=8")


def test_init_from_a_reparameterised_prefix_checkpoint_needs_its_saved_form(tmp_path, small_synthetic):
    first = tmp_path / "first"
    assert vlcap_cli(*train_args(small_synthetic, first, "--peft", "prefix", "--max-steps", 1)).exit_code == 0
    args = train_args(small_synthetic, tmp_path / "second", "--peft", "prefix", "--max-steps", 1,
                      "--init-from", first / "last.safetensors")
    result = vlcap_cli(*args)
    assert result.exit_code == 1 and "prefix (reparam=False) does not match this run's prefix (reparam=True)" \
        in result.output and result.output.strip().endswith("--set peft.options.reparam=false")
    result = vlcap_cli(*args, "--set", "peft.options.reparam=false")
    assert result.exit_code == 0, result.output
