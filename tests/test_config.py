"""Run configs: numbers written the way people write them are numbers."""
import pytest

from conftest import data_overrides
from vlcap.core import config as config_lib
from vlcap.core.train.trainer import train


@pytest.mark.parametrize("raw, value", [("1e-4", 1e-4), ("2E-3", 2e-3), ("-1.5e3", -1500.0), (".5", 0.5),
                                        ("3", 3), ("1_000", 1000), ("abc", "abc"), ("[cider]", ["cider"])])
def test_set_values_are_yaml_1_2_scalars(raw, value):
    assert config_lib.parse_set([f"train.x={raw}"]) == {"train": {"x": value}}


def test_scientific_notation_in_a_config_file_is_a_number(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  lr: 1e-4\n  weight_decay: 5e-2\n")
    cfg = config_lib.resolve("tiny", path)
    assert (cfg.train.lr, cfg.train.weight_decay) == (1e-4, 5e-2)


def test_the_readmes_learning_rate_override_trains(tmp_path, small_synthetic, registry):
    overrides = config_lib.parse_set(["train.lr=1e-4", "train.max_steps=1", "train.batch_size=4", "train.metrics=[]"])
    cfg = config_lib.resolve("tiny", overrides=[data_overrides(small_synthetic), overrides])
    assert train(cfg, tmp_path / "run", registry).steps == 1
