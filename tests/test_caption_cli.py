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
    (["--decoding", "beam", "--set", "beams=3"], "unknown key decoding.options.beams"),
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


def test_num_beams_is_beam_search_whatever_the_checkpoints_strategy(tmp_path, run_dir, images):
    assert read_config(run_dir)["decoding"]["strategy"] != "beam"  # the case that used to fail
    ckpt, out = run_dir / "best.safetensors", tmp_path / "pred.json"
    shortcut = caption(images, "--checkpoint", ckpt, "--out", out, "--num-beams", 2)
    assert shortcut.exit_code == 0, shortcut.output
    spelled = caption(images, "--checkpoint", ckpt, "--out", tmp_path / "beam.json", "--decoding", "beam",
                      "--set", "num_beams=2")
    assert spelled.exit_code == 0, spelled.output
    assert json.loads(out.read_text()) == json.loads((tmp_path / "beam.json").read_text())


@pytest.mark.parametrize("strategy", ["greedy", "top_k"])
def test_num_beams_beside_another_strategy_is_one_line(tmp_path, run_dir, images, strategy):
    out = tmp_path / "pred.json"
    result = caption(images, "--checkpoint", run_dir / "best.safetensors", "--out", out,
                     "--decoding", strategy, "--num-beams", 3)
    assert result.exit_code != 0 and not out.exists()
    assert f"--num-beams 3 means --decoding beam, not --decoding {strategy}" in result.output
    assert len(result.output.strip().splitlines()) == 1


def read_config(run_dir):
    from vlcap.core.model.checkpoint import read_metadata
    return read_metadata(run_dir / "best.safetensors")["config"]


def run_script(images, out, decoder, env_checkpoint=None, script=SCRIPT, caption_args=None):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("VLCAP_CHECKPOINT", None)
    env.pop("VLCAP_CAPTION_ARGS", None)
    if env_checkpoint:
        env["VLCAP_CHECKPOINT"] = str(env_checkpoint)
    if caption_args is not None:
        env["VLCAP_CAPTION_ARGS"] = caption_args
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


@pytest.mark.parametrize("caption_args, same_as", [
    (None, ["--decoding", "beam", "--num-beams", "3"]),  # the script's default
    ("--decoding greedy", ["--decoding", "greedy"]),
    ("--decoding top_k --set k=5 --set seed=0", ["--decoding", "top_k", "--set", "k=5", "--set", "seed=0"]),
    ("--num-beams 2 --max-length 8", ["--decoding", "beam", "--set", "num_beams=2", "--max-length", "8"]),
    ("--set num_beams=2", ["--decoding", "beam", "--set", "num_beams=2"]),
])
def test_hw3_2_caption_args_replace_its_decoding(tmp_path, run_dir, images, caption_args, same_as):
    # The script's own --num-beams 3 must not meet the user's choice (greedy takes no num_beams).
    ckpt = run_dir / "best.safetensors"
    result = run_script(images, tmp_path / "out.json", run_dir / "decoder_model.bin", env_checkpoint=ckpt,
                        caption_args=caption_args)
    assert result.returncode == 0, result.stderr
    direct = caption(images, "--checkpoint", ckpt, "--out", tmp_path / "direct.json", *same_as)
    assert direct.exit_code == 0, direct.output
    assert json.loads((tmp_path / "out.json").read_text()) == json.loads((tmp_path / "direct.json").read_text())


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
