"""train.log=tensorboard: the run's numbers as TensorBoard events, read back with tensorboard's reader."""
import sys

import pytest

from conftest import data_overrides, tiny_config, vlcap_cli
from vlcap.core.errors import VlcapError
from vlcap.core.train.trainer import train


def test_tensorboard_events_hold_loss_lr_throughput_and_validation(tmp_path, small_synthetic, registry):
    pytest.importorskip("tensorboard", reason="the optional extra vlcap[tensorboard] is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    cfg = tiny_config("lora", **data_overrides(small_synthetic),
                      train={"epochs": 2, "batch_size": 8, "metrics": [], "log": "tensorboard"})
    result = train(cfg, tmp_path / "run", registry)
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    scalars = {tag: events.Scalars(tag) for tag in events.Tags()["scalars"]}
    assert [e.step for e in scalars["train/loss"]] == list(range(1, result.steps + 1))
    assert all(e.value > 0 for e in scalars["train/samples_per_second"] + scalars["train/learning_rate"])
    for tag, key in (("eval/loss", "val_loss"), ("train/epoch_loss", "train_loss"),
                     ("train/epoch_seconds", "epoch_seconds")):
        assert [(e.step, pytest.approx(e.value, rel=1e-5)) for e in scalars[tag]] == \
            [(r["step"], r[key]) for r in result.history]


def test_without_the_package_one_line_names_what_to_install(tmp_path, small_synthetic, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard raises ImportError
    result = vlcap_cli("train", "--preset", "tiny", "--train-json", small_synthetic / "train.json",
                       "--train-images", small_synthetic / "images_train", "--out", tmp_path / "run",
                       "--set", "train.log=tensorboard")
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
    assert "pip install 'vlcap[tensorboard]'" in result.output
    assert not (tmp_path / "run" / "history.jsonl").exists()


def test_unknown_logger_is_refused(tmp_path, small_synthetic, registry):
    cfg = tiny_config("lora", **data_overrides(small_synthetic), train={"log": "wandb"})
    with pytest.raises(VlcapError, match="train.log='wandb' is not a logger; choose one of none, tensorboard"):
        train(cfg, tmp_path / "run", registry)
