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
    with run_lock(run):  # free again once the holder ended (the kernel drops a dead holder's lock too)
        pass


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


def broken_val_copy(tmp_path, data, broken):
    """``data``'s validation images copied, the first ``broken`` of them cut to 100 bytes."""
    folder = tmp_path / "val_images"
    folder.mkdir()
    for i, source in enumerate(sorted((data / "images_val").iterdir())):
        raw = source.read_bytes()
        (folder / source.name).write_bytes(raw[:100] if i < broken else raw)
    return folder


def test_unreadable_validation_images_are_found_before_training(tmp_path, small_synthetic, registry):
    from vlcap.core.data import load_captions
    from vlcap.core.errors import VlcapWarning
    from vlcap.core.train.trainer import check_validation_images
    count = len(list((small_synthetic / "images_val").iterdir()))
    folder = broken_val_copy(tmp_path, small_synthetic, count)
    cfg = resolve("tiny", overrides=[{"data": {**data_overrides(small_synthetic)["data"], "val_images": str(folder)}},
                                     {"train": {"max_steps": 1, "batch_size": 4, "metrics": []}}])
    run = tmp_path / "run"
    with pytest.raises(VlcapError, match=f"none of its {count} validation image\\(s\\) .* can be read"):
        train(cfg, run, registry)
    assert not state_path(run).exists() and not (run / "last.safetensors").exists()  # before any step

    (tmp_path / "some").mkdir()
    some = broken_val_copy(tmp_path / "some", small_synthetic, 2)
    captions = load_captions(small_synthetic / "val.json")
    with pytest.warns(VlcapWarning, match=f"2 of {count} validation image\\(s\\) cannot be read"):
        check_validation_images(captions, some, small_synthetic / "val.json")


def test_an_image_whose_name_is_not_utf8_is_captioned_under_an_escaped_key(tmp_path, run_dir, small_synthetic):
    import json
    images = tmp_path / "images"
    images.mkdir()
    source = sorted((small_synthetic / "images_val").iterdir())[0].read_bytes()
    (images / "dog.png").write_bytes(source)
    with open(os.path.join(os.fsencode(images), b"caf\xe9.png"), "wb") as f:  # Latin-1 bytes: not UTF-8
        f.write(source)
    out = tmp_path / "pred.json"
    result = vlcap_cli("caption", images, "--checkpoint", run_dir / "best.safetensors", "--out", out)
    assert result.exit_code == 0, result.output
    assert "the file name caf\\xe9.png is not valid UTF-8; its outputs are keyed 'caf\\\\xe9'" in result.output
    assert sorted(json.loads(out.read_text(encoding="utf-8"))) == ["caf\\xe9", "dog"]
