"""`--device` is checked before anything loads, in every command that has it, and the `train`
flags are declared as data (flag -> config key)."""
import subprocess
import sys

import click
import pytest
import torch
from click.testing import CliRunner

from vlcap import cli
from vlcap.cli import main
from vlcap.core import config as config_lib
from vlcap.core.errors import VlcapError
from vlcap.core.runtime import available_devices

# Devices that are not there on any machine, and (without a GPU) plain cuda.
MISSING = ["foo", "cuda:99", "mps"]
if not torch.cuda.is_available():
    MISSING.append("cuda")


def command_lines(tmp_path):
    """One command line per command with --device; each names inputs that do not exist, so it
    can only fail on the device if the device is checked first."""
    missing = tmp_path / "missing"
    return {
        "train": ["train", "--preset", "tiny", "--train-json", missing / "train.json",
                  "--train-images", missing, "--out", tmp_path / "run"],
        "train --dry-run": ["train", "--preset", "tiny", "--dry-run"],
        "train --resume": ["train", "--resume", tmp_path / "run"],
        "cache-features": ["cache-features", "--preset", "tiny", "--images", missing, "--out", tmp_path / "cache"],
        "caption": ["caption", missing, "--checkpoint", missing / "best.safetensors", "--out", tmp_path / "pred.json"],
        "visualize": ["visualize", missing / "a.png", "--checkpoint", missing / "best.safetensors",
                      "--out-dir", tmp_path / "maps"],
        "classify": ["classify", missing, "--labels", missing / "id2label.json", "--out", tmp_path / "pred.csv",
                     "--clip-model", missing / "clip.pt"],
    }


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], terminal_width=200)


@pytest.mark.parametrize("device", MISSING)
@pytest.mark.parametrize("command", ["train", "train --dry-run", "train --resume", "cache-features", "caption",
                                     "visualize", "classify"])
def test_a_missing_device_is_one_line_before_anything_loads(tmp_path, command, device):
    result = run(*command_lines(tmp_path)[command], "--device", device)
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: --device "), result.output
    assert device in lines[0] and "available" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no run directory, cache, predictions or maps


def test_classify_blames_the_device_not_the_clip_file(tmp_path, tiny_clip):
    (tmp_path / "images").mkdir()
    (tmp_path / "id2label.json").write_text('{"0": "red"}')
    result = run("classify", tmp_path / "images", "--labels", tmp_path / "id2label.json", "--out", tmp_path / "p.csv",
                 "--clip-model", tiny_clip, "--device", "cuda:99")
    assert result.exit_code == 1 and "--device cuda:99" in result.output
    assert "CLIP" not in result.output


@pytest.mark.parametrize("device", ["foo", "cuda:99"])
def test_load_clip_checks_the_device_before_loading(tiny_clip, device):
    from vlcap.core.eval.clip import load_clip
    with pytest.raises(VlcapError, match=f"--device '?{device}'?: .*available"):
        load_clip(str(tiny_clip), device=device)
    assert load_clip(str(tiny_clip), device=torch.device("cpu")).device == torch.device("cpu")


def test_the_command_itself_prints_one_line_and_no_traceback(tmp_path):
    done = subprocess.run([sys.executable, "-m", "vlcap", "caption", tmp_path, "--checkpoint", tmp_path / "c.safetensors",
                           "--out", tmp_path / "p.json", "--device", "foo"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        f"Error: --device 'foo': not a device; use auto, cpu, cuda or cuda:N (available here: {available_devices()})"]


def train_command():
    return main.commands["train"]


def test_every_train_flag_sets_a_config_key_and_nothing_else():
    params = {p.name for p in train_command().params}
    assert set(cli.TRAIN_FLAGS) <= params and set(cli.CACHE_FEATURES_FLAGS) <= {
        p.name for p in main.commands["cache-features"].params}
    every_key = config_lib.to_dict(config_lib.resolve("full"))
    for key in cli.TRAIN_FLAGS.values():
        section, name = key.split(".")
        assert name in every_key[section], key
    overrides = cli.config_overrides({"lr": 0.5, "epochs": None, "train_json": "t.json", "device": "cpu"},
                                     cli.TRAIN_FLAGS)
    assert overrides == {"train": {"lr": 0.5, "device": "cpu"}, "data": {"train_json": "t.json"}}
    with pytest.raises(KeyError):
        cli.config_overrides({"not_a_flag": 1}, cli.TRAIN_FLAGS)


def test_flags_not_given_leave_the_config_file_alone(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("data:\n  cache_features: true\ntrain:\n  epochs: 7\n")
    ctx = train_command().make_context("train", ["--config", str(config), "--preset", "tiny"])
    flags = {name: value for name, value in ctx.params.items() if name in cli.TRAIN_FLAGS}
    cfg = config_lib.resolve("tiny", config, [cli.config_overrides(flags, cli.TRAIN_FLAGS)])
    assert cfg.data.cache_features is True and cfg.train.epochs == 7 and cfg.train.lr == 5e-3


def test_resume_takes_only_the_resumable_flags(tmp_path):
    result = run("train", "--resume", tmp_path, "--device", "cpu", "--epochs", 2, "--max-steps", 9,
                 "--cache-features", "--init-from", tmp_path / "x.safetensors")
    assert result.exit_code == 1 and "drop --cache-features, --init-from" in result.output
    assert not {"--device", "--epochs", "--max-steps"} & set(result.output.split("drop")[1].split())


def test_train_help_describes_every_option_with_its_default():
    options = {p.opts[0]: p for p in train_command().params if isinstance(p, click.Option)}
    assert all(p.help for p in options.values()), [name for name, p in options.items() if not p.help]
    shown = {name: p.show_default for name, p in options.items()}
    # each preset's value (the recipes keep the training defaults)
    assert shown["--epochs"] == ("full: 5; tiny: 3; lora-clip-l14: 5; prefix-clip-l14: 5; adapter-cross-clip-l14: 5; "
                                 "visual-tokens-lora-clip-l14: 5")
    assert shown["--lr"].startswith("full: 0.0002; tiny: 0.005; ")
    assert shown["--batch-size"].startswith("full: 32; tiny: 16; ") and shown["--device"] == "auto"
    text = run("train", "--help").output
    for name in ("--train-json", "--train-images", "--val-json", "--val-images", "--epochs", "--batch-size", "--lr"):
        assert name in text
    assert "[default: (full: 5; tiny: 3; lora-clip-l14: 5; prefix-clip-l14: 5;" in " ".join(text.split())
