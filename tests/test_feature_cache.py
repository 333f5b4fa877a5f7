"""The frozen-encoder feature cache: same training as from images, and stale caches refused."""
import json
import os
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import data_overrides, tiny_config, vlcap_cli
from vlcap.core.train import feature_cache
from vlcap.core.errors import VlcapError
from vlcap.core.train.trainer import train

# No dropout and no validation: two runs differ only in where the ViT tokens come from.
STEPS = {"peft": {"options": {"dropout": 0.0}}, "train": {"batch_size": 8, "epochs": 2, "warmup_steps": 2}}


def cli(*args):
    return vlcap_cli(*args)


def train_config(root, **data):
    overrides = data_overrides(root)
    overrides["data"] = {"train_json": overrides["data"]["train_json"],
                         "train_images": overrides["data"]["train_images"], **data}
    return tiny_config("lora", **{**STEPS, "data": overrides["data"]})


def run_and_load(cfg, out, registry):
    result = train(cfg, out, registry)
    return [r["train_loss"] for r in result.history], load_file(out / "last.safetensors")


def test_training_from_the_cache_matches_training_from_images(tmp_path, synthetic, registry):
    # 4 of the images (20 captions): 3 steps an epoch, 2 epochs, against the cache of all 24.
    captions = json.loads((synthetic / "train.json").read_text())
    captions["images"] = captions["images"][:4]
    kept = {image["id"] for image in captions["images"]}
    captions["annotations"] = [a for a in captions["annotations"] if a["image_id"] in kept]
    (tmp_path / "train.json").write_text(json.dumps(captions))
    (tmp_path / "images_train").symlink_to(synthetic / "images_train")
    losses, weights = run_and_load(train_config(tmp_path), tmp_path / "images", registry)
    assert len(losses) == 2 and losses[1] < losses[0]

    cache = tmp_path / "cache32"
    result = cli("cache-features", "--preset", "tiny", "--images", synthetic / "images_train",
                 "--out", cache, "--dtype", "float32")
    assert result.exit_code == 0, result.output
    assert "on disk" in result.output and "cached 24 images" in result.output
    cached_losses, cached_weights = run_and_load(train_config(tmp_path, feature_cache=str(cache)),
                                                 tmp_path / "cached32", registry)
    assert cached_losses == pytest.approx(losses, rel=1e-5)
    for name, value in weights.items():
        torch.testing.assert_close(cached_weights[name], value, rtol=1e-4, atol=1e-5)

    # The default: fp16 tokens, built automatically into the run directory.
    out = tmp_path / "cached16"
    half_losses, _ = run_and_load(train_config(tmp_path, cache_features=True), out, registry)
    assert json.loads((out / "feature_cache" / "manifest.json").read_text())["dtype"] == "float16"
    assert half_losses == pytest.approx(losses, rel=1e-2)


@pytest.fixture
def cached_images(tmp_path, synthetic):
    """A private copy of the synthetic training images (tests change them) and its fp16 cache."""
    shutil.copytree(synthetic / "images_train", tmp_path / "images_train")
    shutil.copy(synthetic / "train.json", tmp_path / "train.json")
    assert cli("cache-features", "--preset", "tiny", "--images", tmp_path / "images_train",
               "--out", tmp_path / "cache").exit_code == 0
    return tmp_path


def train_from_cache(root, *extra):
    return cli("train", "--preset", "tiny", "--train-json", root / "train.json", "--train-images",
               root / "images_train", "--feature-cache", root / "cache", "--out", root / "run",
               "--max-steps", 1, "--overwrite", *extra)


def test_a_cache_of_another_encoder_is_refused(cached_images):
    other = train_from_cache(cached_images, "--encoder", "test_vit2")
    assert other.exit_code == 1 and "cached with encoder 'test_vit' but this run uses 'test_vit2'" in other.output
    reseeded = train_from_cache(cached_images, "--set", "model.init_seed=1")
    assert reseeded.exit_code == 1 and "other 'test_vit' weights" in reseeded.output


def test_a_changed_or_uncached_image_is_refused(cached_images):
    images = cached_images / "images_train"
    assert train_from_cache(cached_images).exit_code == 0
    # The same bytes, rewritten later: size and mtime_ns are what the cache keys on.
    path = images / "train_0003.png"
    data = path.read_bytes()
    stat = path.stat()
    path.write_bytes(data + b"\0")
    changed = train_from_cache(cached_images)
    assert changed.exit_code == 1 and "1 image file(s)" in changed.output and "train_0003.png" in changed.output
    path.write_bytes(data)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert train_from_cache(cached_images).exit_code == 0

    captions = json.loads((cached_images / "train.json").read_text())
    captions["images"].append({"file_name": "new.png", "id": 999})
    captions["annotations"].append({"caption": "A new image.", "id": 999, "image_id": 999})
    (cached_images / "train.json").write_text(json.dumps(captions))
    shutil.copy(path, images / "new.png")
    uncached = train_from_cache(cached_images)
    assert uncached.exit_code == 1 and "not in the cache: new.png" in uncached.output


def test_the_cache_is_not_written_without_disk_space(tmp_path, synthetic, monkeypatch):
    free = shutil.disk_usage(tmp_path)._replace(free=1000)
    monkeypatch.setattr(feature_cache.shutil, "disk_usage", lambda path: free)
    result = cli("cache-features", "--preset", "tiny", "--images", synthetic / "images_train", "--out", tmp_path / "c")
    assert result.exit_code == 1 and "needs 310.3 KB but only 1.0 KB is free" in result.output
    assert list(tmp_path.iterdir()) == []


def test_an_existing_cache_is_never_overwritten(tmp_path, synthetic):
    (tmp_path / "c").mkdir()
    with pytest.raises(VlcapError, match="already exists"):
        feature_cache.write_feature_cache(None, synthetic / "images_train", tmp_path / "c")


def test_unreadable_images_are_skipped_when_caching_as_in_training(tmp_path, synthetic):
    shutil.copytree(synthetic / "images_train", tmp_path / "images_train")
    shutil.copy(synthetic / "train.json", tmp_path / "train.json")
    broken = tmp_path / "images_train" / "train_0002.png"
    broken.write_bytes(broken.read_bytes()[:60])
    result = cli("cache-features", "--preset", "tiny", "--images", tmp_path / "images_train", "--out", tmp_path / "cache")
    assert result.exit_code == 0, result.output
    assert "1 unreadable image(s) were skipped" in result.output and "cached 23 images" in result.output
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert list(manifest["unreadable"]) == ["train_0002.png"] and "train_0002.png" not in manifest["images"]
    trained = train_from_cache(tmp_path, "--batch-size", 120)  # one step over all: its captions are skipped
    assert trained.exit_code == 0, trained.output
    assert "unreadable image(s) were skipped: " in trained.output and "train_0002.png" in trained.output


@pytest.mark.parametrize("damage, message", [
    (lambda c: (c / "features.npy").unlink(), "features.npy is missing"),
    (lambda c: (c / "features.npy").write_bytes((c / "features.npy").read_bytes()[:1000]), "damaged or truncated"),
    (lambda c: (c / "manifest.json").write_text(json.dumps({**json.loads((c / "manifest.json").read_text()),
                                                             "images": None})), "manifest.json: damaged"),
    (lambda c: (c / "manifest.json").write_text('{"format": "vlcap-feature-cache/1"}'), "manifest.json: damaged"),
    (lambda c: (c / "manifest.json").write_text("[" * 100000), "manifest.json: (not valid JSON|unreadable)"),
])
def test_a_damaged_cache_is_one_line(cached_images, damage, message):
    damage(cached_images / "cache")
    result = train_from_cache(cached_images)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1 and re.search(message, result.output), result.output
