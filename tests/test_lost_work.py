"""No lost work: a run directory is held by one run at a time, a new run never deletes another
run's resume state, and --resume works from any working directory."""
import os

import pytest

from conftest import data_overrides, vlcap_cli
from vlcap.core.config import resolve
from vlcap.core.errors import VlcapError
from vlcap.core.train.resume import run_lock, state_path
from vlcap.core.train.trainer import train


def one_step(data, **train_keys):
    overrides = {"max_steps": 1, "batch_size": 4, "metrics": [], **train_keys}
    return resolve("tiny", overrides=[{"data": {k: v for k, v in data_overrides(data)["data"].items()
                                                if k.startswith("train")}}, {"train": overrides}])


def test_a_run_directory_in_use_is_refused_naming_the_pid(tmp_path, small_synthetic, registry):
    run = tmp_path / "run"
    with run_lock(run):  # another run holds it (flock is per open file, so this process counts)
        with pytest.raises(VlcapError, match=f"{run}: in use by another vlcap train \\(PID {os.getpid()}\\)"):
            train(one_step(small_synthetic), run, registry)
    assert not state_path(run).exists()
    assert train(one_step(small_synthetic), run, registry).steps == 1  # free again once the holder ended


def test_a_new_run_never_deletes_another_runs_resume_state(tmp_path, small_synthetic, registry):
    run = tmp_path / "run"
    train(one_step(small_synthetic), run, registry)
    before = state_path(run).read_bytes()
    with pytest.raises(VlcapError, match="holds another run .*vlcap train --resume .* or pass --overwrite"):
        train(one_step(small_synthetic, seed=1), run, registry)
    assert state_path(run).read_bytes() == before
    args = ["train", "--preset", "tiny", "--out", run, "--max-steps", 1, "--batch-size", 4, "--set", "train.metrics=[]",
            "--train-json", small_synthetic / "train.json", "--train-images", small_synthetic / "images_train"]
    assert "pass --overwrite" in vlcap_cli(*args).output
    assert vlcap_cli(*args, "--overwrite").exit_code == 0


def test_resume_works_from_any_working_directory(tmp_path, small_synthetic, monkeypatch):
    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    for name in ("train.json", "images_train"):
        os.symlink(small_synthetic / name, work / "data" / name)
    monkeypatch.chdir(work)
    result = vlcap_cli("train", "--preset", "tiny", "--out", "run", "--max-steps", 1, "--batch-size", 4,
                       "--set", "train.metrics=[]", "--train-json", "data/train.json", "--train-images", "data/images_train")
    assert result.exit_code == 0, result.output
    monkeypatch.chdir(tmp_path)
    result = vlcap_cli("train", "--resume", work / "run", "--max-steps", 2)
    assert result.exit_code == 0, result.output
    assert "trained 2 steps" in result.output
