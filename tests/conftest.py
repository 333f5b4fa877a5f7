import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from vlcap.core.plugins import registry as load_registry
from vlcap.apps.synthetic import make_synthetic_set
from vlcap.cli import main
from vlcap.testing.builders import tiny_config  # noqa: F401 (the test files import it from here)

pytest_plugins = ["pytester"]  # in-process pytest runs (the kit's pytest plugin)

SHARED = Path(os.environ.get("VLCAP_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"real data folder {SHARED} is absent")
PEFT_METHODS = ("lora", "adapter", "prefix")


def vlcap_cli(*args, env=None, width=200):
    """``vlcap ARGS...`` through click's test runner, as a user types it; never a traceback."""
    result = CliRunner().invoke(main, [str(a) for a in args], terminal_width=width, env=env)
    assert "Traceback" not in result.output, result.output
    return result


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


def data_overrides(root):
    return {"data": {"train_json": str(root / "train.json"), "train_images": str(root / "images_train"),
                     "val_json": str(root / "val.json"), "val_images": str(root / "images_val")}}


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory, synthetic, registry):
    """A tiny-preset checkpoint from a 2-step training run (its random decoder beside it)."""
    out = tmp_path_factory.mktemp("run")
    cfg = tiny_config("lora", data={"train_json": str(synthetic / "train.json"),
                                    "train_images": str(synthetic / "images_train")},
                      train={"max_steps": 2, "batch_size": 8})
    from vlcap.core.train.trainer import train
    train(cfg, out, registry)
    return out


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


def tiny_clip_model(seed=0):
    """A tiny open_clip CLIP (1-layer towers, 32-px images, OpenAI's 49,408-token vocabulary)
    whose weights survive the fp16 round trip ``clip.load`` puts OpenAI checkpoints through."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
    torch.manual_seed(seed)
    model = CLIP(embed_dim=32, quick_gelu=True,
                 vision_cfg=CLIPVisionCfg(layers=1, width=64, patch_size=8, image_size=32),
                 text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=1, layers=1)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    return model


def write_tiny_clip(path, model=None, torchscript=False):
    """Save a CLIP in OpenAI's format: a state dict with OpenAI's key names, or (``torchscript``)
    a traced archive like the files OpenAI distributes."""
    model = model or tiny_clip_model()
    if torchscript:
        # OpenAI's models hold the causal text mask as a plain attribute, not a state-dict buffer.
        mask = model._buffers.pop("attn_mask")
        model.attn_mask = mask
        example = (torch.zeros(1, 3, 32, 32), torch.zeros(1, 77, dtype=torch.long))
        torch.jit.trace(model, example, check_trace=False).save(str(path))
    else:
        torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """Path of a tiny local CLIP checkpoint (state dict in OpenAI's format)."""
    return write_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny_clip.pt")


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory, small_synthetic, registry):
    """Run directories as `vlcap train` leaves them, for compare and report: ``lora`` (r=4, 2
    epochs, selected by validation loss), ``adapter`` (2 epochs, also scored by CIDEr),
    ``interrupted`` (the lora run as a kill after its first epoch leaves it: the history is
    written whole at each epoch's end) and ``unstarted`` (killed before an epoch ended)."""
    import shutil
    from vlcap.core.train.trainer import train
    root = tmp_path_factory.mktemp("runs")
    data = data_overrides(small_synthetic)["data"]
    runs = {}
    for name, method, options, metrics in (("lora", "lora", {"r": 4}, []), ("adapter", "adapter", {}, ["cider"])):
        cfg = tiny_config(method, data=data, peft={"method": method, "options": options},
                          train={"epochs": 2, "batch_size": 8, "metrics": metrics})
        runs[name] = train(cfg, root / name, registry)
    interrupted, unstarted = root / "interrupted", root / "unstarted"
    shutil.copytree(root / "lora", interrupted)
    history = (interrupted / "history.jsonl").read_text().splitlines()
    (interrupted / "history.jsonl").write_text(history[0] + "\n")
    unstarted.mkdir()
    shutil.copy(root / "lora" / "config.yaml", unstarted)
    return root, runs
