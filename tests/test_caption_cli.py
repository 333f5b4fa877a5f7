"""`vlcap caption` and hw3_2.sh as a user (and the course's grader) runs them."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from conftest import SHARED, needs_shared, vlcap_cli

SCRIPT = Path(__file__).resolve().parents[1] / "hw3_2.sh"


@pytest.fixture
def images(tmp_path, synthetic):
    """Three readable images with mixed suffixes and cases, plus a file that is not an image."""
    folder = tmp_path / "images"
    folder.mkdir()
    sources = sorted((synthetic / "images_val").iterdir())
    Image.open(sources[0]).save(folder / "a.JPG")
    Image.open(sources[1]).save(folder / "b.png")
    Image.open(sources[2]).save(folder / "c.webp")
    (folder / "notes.txt").write_text("not an image")
    return folder


def caption(*args):
    return vlcap_cli("caption", *args)


def test_caption_writes_one_caption_per_image_keyed_by_stem(tmp_path, run_dir, images):
    out = tmp_path / "pred.json"
    result = caption(images, "--checkpoint", run_dir / "best.safetensors", "--out", out,
                     "--decoding", "beam", "--num-beams", 2, "--set", "no_repeat_ngram_size=2", "--batch-size", 2)
    assert result.exit_code == 0, result.output
    predictions = json.loads(out.read_text())
    assert sorted(predictions) == ["a", "b", "c"] and all(isinstance(c, str) for c in predictions.values())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "pred.json"]  # no temporary file left


def test_unreadable_images_are_warned_listed_and_fail_unless_skipped(tmp_path, run_dir, images):
    (images / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "pred.json"
    result = caption(images, "--checkpoint", run_dir / "best.safetensors", "--out", out)
    assert result.exit_code != 0
    assert any(line.startswith("warning:") and "broken.jpg" in line for line in result.output.splitlines())
    assert "--skip-bad-images" in result.output
    skipped = caption(images, "--checkpoint", run_dir / "best.safetensors", "--out", out, "--skip-bad-images")
    assert skipped.exit_code == 0, skipped.output
    assert sorted(json.loads(out.read_text())) == ["a", "b", "c"]


@pytest.mark.parametrize("args, message", [
    (["--decoding", "nope"], "unknown decoding strategy 'nope'"),
    (["--decoding", "beam", "--set", "beams=3"], "unknown key(s) beams"),
    (["--decoding", "top_p", "--set", "p=2"], "decoding.options.p"),
])
def test_bad_decoding_options_fail_in_one_line_and_write_nothing(tmp_path, run_dir, images, args, message):
    out = tmp_path / "pred.json"
    result = caption(images, "--checkpoint", run_dir / "best.safetensors", "--out", out, *args)
    assert result.exit_code != 0 and message in result.output
    assert not out.exists()


def test_image_folder_problems_are_named(tmp_path, run_dir, images):
    ckpt = run_dir / "best.safetensors"
    assert "image folder not found" in caption(tmp_path / "missing", "--checkpoint", ckpt, "--out", tmp_path / "o.json").output
    Image.open(images / "b.png").save(images / "a.png")
    assert "share the file stem(s) a" in caption(images, "--checkpoint", ckpt, "--out", tmp_path / "o.json").output


def run_script(images, out, decoder, env_checkpoint=None, script=SCRIPT):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("VLCAP_CHECKPOINT", None)
    if env_checkpoint:
        env["VLCAP_CHECKPOINT"] = str(env_checkpoint)
    return subprocess.run(["bash", str(script), str(images), str(out), str(decoder)], env=env,
                          capture_output=True, text=True)


def test_hw3_2_finds_the_checkpoint_beside_the_script(tmp_path, run_dir, images):
    # The grader runs the script from a fresh clone: checkpoints/best.safetensors next to it.
    clone = tmp_path / "clone"
    (clone / "checkpoints").mkdir(parents=True)
    shutil.copy(SCRIPT, clone / "hw3_2.sh")
    shutil.copy(run_dir / "best.safetensors", clone / "checkpoints" / "best.safetensors")
    result = run_script(images, tmp_path / "out.json", run_dir / "decoder_model.bin", script=clone / "hw3_2.sh")
    assert result.returncode == 0, result.stderr
    assert sorted(json.loads((tmp_path / "out.json").read_text())) == ["a", "b", "c"]


def test_hw3_2_needs_three_arguments():
    result = subprocess.run(["bash", str(SCRIPT), "only-one"], capture_output=True, text=True)
    assert result.returncode == 2 and "usage:" in result.stderr


@needs_shared
def test_hw3_2_captions_the_flickr8k_validation_photos(tmp_path, run_dir):
    images = SHARED / "data/flickr8k_1k/images_val"
    out = tmp_path / "out.json"
    result = run_script(images, out, run_dir / "decoder_model.bin", env_checkpoint=run_dir / "best.safetensors")
    assert result.returncode == 0, result.stderr
    predictions = json.loads(out.read_text())
    assert len(predictions) == 200
    assert set(predictions) == {p.stem for p in images.iterdir()}
