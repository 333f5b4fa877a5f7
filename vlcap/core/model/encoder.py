"""The frozen image encoder: any timm ViT, whose token sequence (CLS + patches) feeds the decoder."""
import contextlib
import socket
from urllib.parse import urlparse

import timm
import torch
from timm.data import create_transform, resolve_data_config
from torch import nn

from vlcap.core.errors import VlcapError


class ImageEncoder(nn.Module):
    def __init__(self, name, pretrained=True):
        super().__init__()
        self.name = name
        self.vit = create_vit(name, pretrained, num_classes=0)
        if not hasattr(self.vit, "num_prefix_tokens") or not hasattr(self.vit, "patch_embed"):
            raise VlcapError(f"encoder '{name}' is not a ViT (no patch tokens); choose a timm ViT")
        self.embed_dim = self.vit.num_features
        # Leading CLS/register tokens; the rest form the patch grid (used to draw attention maps).
        self.num_prefix_tokens = self.vit.num_prefix_tokens
        self.grid_size = tuple(self.vit.patch_embed.grid_size)

    def forward(self, pixels):
        return self.vit.forward_features(pixels)  # (B, prefix + patches, embed_dim)

    def train(self, mode=True):
        return super().train(False)  # frozen: dropout and friends stay off, always

    def transform(self):
        return vit_transform(self.vit)

    def unnormalize(self, pixels):
        return unnormalize(self.vit, pixels)

    @property
    def num_tokens(self):
        return self.num_prefix_tokens + self.grid_size[0] * self.grid_size[1]


def data_config(vit):
    """The timm model's data config (mean, std, interpolation, crop), at the image size the model
    was built for: one built with another ``img_size`` than its pretrained config keeps the
    pretrained config's size there."""
    size = getattr(getattr(vit, "patch_embed", None), "img_size", None)
    return resolve_data_config({"input_size": (3, *size)} if size else {}, model=vit)


def vit_transform(vit):
    """Eval-time preprocessing from the timm model's own data config (size, mean, std)."""
    return create_transform(**data_config(vit), is_training=False)


def unnormalize(vit, pixels):
    """Preprocessed ``(3, H, W)`` pixels back to an ``(H, W, 3)`` RGB array in [0, 1]: the
    image exactly as the ViT sees it (resized and cropped), which its patch grid covers."""
    data = data_config(vit)
    mean, std = (torch.tensor(data[k], dtype=torch.float32).view(3, 1, 1) for k in ("mean", "std"))
    return (pixels.detach().float().cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def create_vit(name, pretrained=True, offline_hint="use --preset tiny offline", **kwargs):
    """``timm.create_model(name, pretrained, **kwargs)`` with its failures as one line each: an
    unknown name, and pretrained weights that cannot be fetched (without network the hub client
    works from its cache only, so it fails at once instead of retrying); ``offline_hint`` ends that
    error with what to do instead."""
    try:
        with hub_offline_unless_reachable() if pretrained else contextlib.nullcontext():
            return timm.create_model(name, pretrained=pretrained, **kwargs)
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise VlcapError(f"unknown timm encoder '{name}'; see timm.list_models('vit_*')") from None
        raise
    except OSError as exc:  # hub download failed (offline, proxy, ...)
        raise VlcapError(f"could not fetch pretrained weights for encoder '{name}' "
                         f"({type(exc).__name__}); connect once so timm caches them, or {offline_hint}") from exc


def hub_reachable(timeout=3.0):
    """Whether a TCP connection to the Hugging Face hub (``HF_ENDPOINT``) opens within ``timeout``."""
    from huggingface_hub import constants
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=timeout).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def hub_offline_unless_reachable():
    """Inside, the hub client works offline (its cache only) when the hub cannot be reached: a
    machine without network then fails at once, or loads cached weights, instead of waiting
    through the client's retries."""
    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE or hub_reachable():
        yield
        return
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = False
