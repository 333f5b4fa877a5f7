import os
from pathlib import Path

import pytest
import torch

from vlcap.core import config as config_lib
from vlcap.core.plugins import registry as load_registry
from vlcap.core.synthetic import make_synthetic_set

SHARED = Path(os.environ.get("VLCAP_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"real data folder {SHARED} is absent")
PEFT_METHODS = ("lora", "adapter", "prefix")


@pytest.fixture(scope="session")
def registry():
    return load_registry()


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory):
    return make_synthetic_set(tmp_path_factory.mktemp("synthetic"), train_images=24, val_images=6)


@pytest.fixture(scope="session")
def small_synthetic(tmp_path_factory):
    """40 training captions: 5 steps of 8 per epoch, for tests that train several times."""
    return make_synthetic_set(tmp_path_factory.mktemp("small_synthetic"), train_images=8, val_images=4)


def tiny_config(method="lora", **overrides):
    return config_lib.resolve("tiny", overrides=[{"peft": {"method": method}}, overrides])


def data_overrides(root):
    return {"data": {"train_json": str(root / "train.json"), "train_images": str(root / "images_train"),
                     "val_json": str(root / "val.json"), "val_images": str(root / "images_val")}}


@pytest.fixture
def batch():
    torch.manual_seed(0)
    return torch.randn(2, 3, 160, 160), torch.randint(0, 50257, (2, 9))


def install_package(root, dist_name, module_name, source, entry_point=None):
    """A minimal installed distribution in ``root`` (put it on sys.path): a dist-info with
    METADATA and a ``vlcap`` entry point, plus the plugin module itself."""
    (root / f"{module_name}.py").write_text(source)
    info = root / f"{dist_name.replace('-', '_')}-0.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist_name}\nVersion: 0.3\n")
    (info / "entry_points.txt").write_text(f"[vlcap]\n{entry_point or module_name} = {module_name}\n")


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A folder on sys.path where tests 'pip install' fake plugin packages."""
    path = tmp_path / "site"
    path.mkdir()
    monkeypatch.syspath_prepend(str(path))
    return path
