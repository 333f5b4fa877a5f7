"""A source checkout works without `pip install`: vlcap's built-in plugins are registered by the
core itself, so `PYTHONPATH=. python -m vlcap` and the course scripts run from a fresh clone on a
machine that has the dependencies but never installed vlcap.

The subprocesses run Python with -S (no site-packages processing, so the editable install's
import hook of this environment is not there) and the dependencies' folder on PYTHONPATH after
the checkout: vlcap can only come from the checkout."""
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUILTINS = {"cross-attention", "visual-tokens", "lora", "adapter", "prefix", "none", "greedy", "beam", "top_k", "top_p", "cider", "clipscore"}


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    """The package and the course scripts as a fresh clone has them, plus a `python3` on PATH
    that runs without site-packages processing."""
    clone = tmp_path_factory.mktemp("clone")
    shutil.copytree(ROOT / "vlcap", clone / "vlcap", ignore=shutil.ignore_patterns("__pycache__"))
    for script in ("hw3_1.sh", "hw3_2.sh"):
        shutil.copy(ROOT / script, clone / script)
    bin_dir = clone.parent / f"{clone.name}-bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "$@"\n')
    (bin_dir / "python3").chmod(0o755)
    return clone, bin_dir


def environment(bin_dir, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLCAP_")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", PYTHONPATH=sysconfig.get_paths()["purelib"])
    return {**env, **extra}


def test_python_dash_m_vlcap_lists_the_builtins_from_a_checkout(checkout):
    clone, bin_dir = checkout
    env = environment(bin_dir, PYTHONPATH=f".{os.pathsep}{sysconfig.get_paths()['purelib']}")
    where = subprocess.run(["python3", "-c", "import vlcap; print(vlcap.__file__)"], cwd=clone, env=env,
                           capture_output=True, text=True, check=True).stdout
    assert Path(where.strip()).resolve().is_relative_to(clone.resolve())
    done = subprocess.run(["python3", "-m", "vlcap", "list-plugins", "--json"], cwd=clone, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    listed = {e["name"]: e for e in json.loads(done.stdout)}
    assert BUILTINS <= set(listed)
    assert all(listed[name]["package"] == "vlcap" and listed[name]["version"] for name in BUILTINS)


def test_hw3_2_captions_a_folder_from_a_checkout(checkout, run_dir, synthetic, tmp_path):
    clone, bin_dir = checkout
    env = environment(bin_dir, VLCAP_CHECKPOINT=str(run_dir / "best.safetensors"))
    out = tmp_path / "pred.json"
    done = subprocess.run(["bash", str(clone / "hw3_2.sh"), str(synthetic / "images_val"), str(out),
                           str(run_dir / "decoder_model.bin")], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    predictions = json.loads(out.read_text())
    assert set(predictions) == {p.stem for p in (synthetic / "images_val").iterdir()}
    assert all(isinstance(c, str) for c in predictions.values())
