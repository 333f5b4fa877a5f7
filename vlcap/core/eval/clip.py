"""OpenAI CLIP models for scoring captions (CLIPScore) and zero-shot classification.

A model is named like OpenAI's ``clip.load`` does (``ViT-B/32``, ``ViT-L/14``, ...) or given as a
local OpenAI-format file: the TorchScript archive OpenAI distributes, or a plain state dict with
OpenAI's key names. open_clip builds and preprocesses it exactly as ``clip.load`` would (same
weights, bicubic resize + center crop + CLIP mean/std, the same BPE tokenizer) without importing
``pkg_resources``, which ``openai-clip`` needs and setuptools >= 81 no longer ships.
"""
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from vlcap.core.errors import VlcapError
from vlcap.core.runtime import resolve_device

CLIP_MODEL_ENV = "VLCAP_CLIP_MODEL"
# OpenAI's model names (as ``clip.available_models()``) -> open_clip's names for the same weights.
OPENAI_MODELS = {"RN50": "RN50", "RN101": "RN101", "RN50x4": "RN50x4", "RN50x16": "RN50x16", "RN50x64": "RN50x64",
                 "ViT-B/32": "ViT-B-32", "ViT-B/16": "ViT-B-16", "ViT-L/14": "ViT-L-14", "ViT-L/14@336px": "ViT-L-14-336"}


def clip_model_name(name=None, default="ViT-B/32"):
    """``--clip-model`` if given, else ``$VLCAP_CLIP_MODEL``, else ``default``."""
    return name or os.environ.get(CLIP_MODEL_ENV) or default


@dataclass
class Clip:
    model: torch.nn.Module
    preprocess: object  # PIL image -> (3, H, W) tensor
    tokenizer: object  # open_clip SimpleTokenizer (OpenAI's BPE, 77-token context)
    device: torch.device
    name: str

    @property
    def context_length(self):
        return self.tokenizer.context_length

    def is_too_long(self, text):
        """True if ``text`` does not fit CLIP's context (start + tokens + end) and gets truncated."""
        return len(self.tokenizer.encode(text)) + 2 > self.context_length

    @torch.no_grad()
    def encode_images(self, pixels):
        """Unit-length image embeddings, float32, ``(B, embed_dim)``."""
        features = self.model.encode_image(pixels.to(self.device, dtype=self._dtype()))
        return F.normalize(features.float(), dim=-1)

    @torch.no_grad()
    def encode_texts(self, texts):
        """Unit-length text embeddings, float32, ``(len(texts), embed_dim)``. Texts longer than
        the context are cut to it, keeping the end token (``clip.tokenize(truncate=True)``)."""
        tokens = self.tokenizer(list(texts)).to(self.device)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)

    def _dtype(self):
        return self.model.visual.conv1.weight.dtype


def read_clip_state(path):
    """The weights of an OpenAI-format CLIP file, never unpickled whatever torch's default: the
    TorchScript archive OpenAI distributes (read by ``torch.jit.load``), else a state dict read
    with ``weights_only=True`` (plain tensors only; optionally under ``state_dict`` with
    ``module.`` prefixes, as open_clip accepts)."""
    try:
        return torch.jit.load(path, map_location="cpu").state_dict()
    except RuntimeError:  # not a TorchScript archive
        pass
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = {k.removeprefix("module."): v for k, v in state["state_dict"].items()}
    if not isinstance(state, dict):
        raise TypeError(f"holds a {type(state).__name__}, not a state dict")
    return state


def openai_clip(source, precision, device):
    """open_clip's ``load_openai_model`` with the file read by ``read_clip_state`` (open_clip
    falls back to ``torch.load`` with torch's default, which before torch 2.6 unpickles)."""
    from open_clip.openai import (OPENAI_DATASET_MEAN, OPENAI_DATASET_STD, build_model_from_openai_state_dict,
                                  download_pretrained_from_url, get_cast_dtype, get_pretrained_url)
    url = get_pretrained_url(source, "openai")
    path = download_pretrained_from_url(url) if url else source
    model = build_model_from_openai_state_dict(read_clip_state(path), cast_dtype=get_cast_dtype(precision))
    model = model.to(device)
    if precision != "fp16":
        model.float()
    model.visual.image_mean, model.visual.image_std = OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    return model


def load_clip(name_or_path=None, device=None, default="ViT-B/32"):
    """Load an OpenAI CLIP model by name or from a local OpenAI-format file onto ``device``: a
    ``torch.device`` or a name ``resolve_device`` takes (None: CUDA when there is a GPU, else CPU);
    a device that is not there is a ``VlcapError`` before anything loads.

    As ``clip.load``: fp16 weights on CUDA, fp32 on CPU.
    """
    import open_clip
    from open_clip.transform import image_transform

    name = clip_model_name(name_or_path, default)
    device = resolve_device(device)
    precision = "fp16" if device.type == "cuda" else "fp32"
    path = Path(name).expanduser()
    if path.is_file():
        source = str(path)
    else:
        source = OPENAI_MODELS.get(name, name)
        if source not in OPENAI_MODELS.values():
            raise VlcapError(f"CLIP model '{name}' is neither a file nor an OpenAI model name "
                             f"({', '.join(OPENAI_MODELS)}); pass --clip-model or set {CLIP_MODEL_ENV}")
    try:
        with warnings.catch_warnings():  # open_clip tries torch.jit.load first, which warns it is deprecated
            warnings.simplefilter("ignore", FutureWarning)
            model = openai_clip(source, precision, device)
    except (OSError, ConnectionError) as exc:  # download failed: offline, proxy, ...
        raise VlcapError(f"could not fetch CLIP '{name}' ({type(exc).__name__}); connect once so it is cached, "
                         "or pass a local OpenAI-format checkpoint with --clip-model PATH") from exc
    except Exception as exc:  # torch/open_clip raise many kinds for a file that is not a CLIP model
        raise VlcapError(f"{name}: not an OpenAI-format CLIP checkpoint ({type(exc).__name__}); pass a TorchScript "
                         "archive as OpenAI distributes it or a state dict with OpenAI's key names") from exc
    model.eval()
    preprocess = image_transform(model.visual.image_size, is_train=False)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")  # every OpenAI CLIP shares this BPE and context
    return Clip(model, preprocess, tokenizer, device, name)
