"""Loading OpenAI-format CLIP models (shared by CLIPScore and zero-shot classification)."""
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_clip_model, write_tiny_clip

from vlcap.core.eval.clip import CLIP_MODEL_ENV, clip_model_name, load_clip
from vlcap.core.errors import VlcapError


@pytest.mark.parametrize("torchscript", [False, True], ids=["state-dict", "torchscript"])
def test_local_openai_checkpoint_reproduces_the_model(tmp_path, torchscript):
    model = tiny_clip_model(seed=3)
    images = torch.randn(2, 3, 32, 32)
    texts = ["a photo of a dog", "two cats on a red sofa"]
    with torch.no_grad():
        want_images = F.normalize(model.encode_image(images), dim=-1)
        want_texts = F.normalize(model.encode_text(load_clip_tokens(texts)), dim=-1)
    clip = load_clip(str(write_tiny_clip(tmp_path / "clip.pt", model, torchscript=torchscript)), device="cpu")
    torch.testing.assert_close(clip.encode_images(images), want_images, rtol=0, atol=1e-6)
    torch.testing.assert_close(clip.encode_texts(texts), want_texts, rtol=0, atol=1e-6)
    assert clip.model.visual.image_size == (32, 32)


def load_clip_tokens(texts):
    import open_clip
    return open_clip.get_tokenizer("ViT-B-32")(texts)


def test_preprocess_gives_the_model_input_size(tiny_clip):
    from PIL import Image
    clip = load_clip(str(tiny_clip), device="cpu")
    pixels = clip.preprocess(Image.new("L", (90, 40), 128))  # grayscale, not square
    assert pixels.shape == (3, 32, 32)


def test_long_captions_are_truncated_not_fatal(tiny_clip):
    clip = load_clip(str(tiny_clip), device="cpu")
    long = "a very long caption " * 40
    assert clip.is_too_long(long) and not clip.is_too_long("a dog")
    assert clip.encode_texts([long, "a dog"]).shape == (2, 32)


def test_model_name_from_flag_then_environment_then_default(monkeypatch):
    monkeypatch.delenv(CLIP_MODEL_ENV, raising=False)
    assert clip_model_name(None) == "ViT-B/32"
    assert clip_model_name(None, default="ViT-L/14") == "ViT-L/14"
    monkeypatch.setenv(CLIP_MODEL_ENV, "RN50")
    assert clip_model_name(None) == "RN50"
    assert clip_model_name("ViT-B/16") == "ViT-B/16"


def test_bad_model_names_and_files_are_one_line_errors(tmp_path):
    with pytest.raises(VlcapError, match="neither a file nor an OpenAI model name"):
        load_clip("ViT-Q/9", device="cpu")
    bad = tmp_path / "notes.pt"
    bad.write_text("not a model")
    with pytest.raises(VlcapError, match="not an OpenAI-format CLIP checkpoint"):
        load_clip(str(bad), device="cpu")


class Payload:
    def __reduce__(self):
        return (print, ("pickled code ran",))


@pytest.mark.parametrize("wrap", [lambda sd: {**sd, "evil": Payload()}, lambda sd: {"state_dict": Payload()}])
def test_a_clip_file_with_pickled_code_is_refused_whatever_torchs_default(tmp_path, capsys, monkeypatch, wrap):
    real_load = torch.load
    # as torch < 2.6 behaves: unpickling unless asked not to
    monkeypatch.setattr(torch, "load", lambda *a, **k: real_load(*a, **{"weights_only": False, **k}))
    path = tmp_path / "clip.pt"
    real_save_sd = tiny_clip_model(seed=1).state_dict()
    torch.save(wrap(real_save_sd), path)
    with pytest.raises(VlcapError, match="not an OpenAI-format CLIP checkpoint"):
        load_clip(str(path), device="cpu")
    assert "pickled code ran" not in capsys.readouterr().out
