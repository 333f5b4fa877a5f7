"""A timm ViT fine-tuned as an image classifier, and its trainable-only checkpoint.

What trains (``ClassifierModelConfig.method``): ``full``, every weight; ``linear``, the new
classification head alone (a linear probe of the frozen ViT); ``lora``, loralib's LoRA on the
query and value slices of every block's fused ``qkv`` plus the head. The checkpoint holds exactly
the parameters with ``requires_grad`` as safetensors, and in its metadata the resolved config and
the class names, so ``load_classifier`` rebuilds the model (the frozen part from the same timm
weights, or for a non-pretrained ViT the same seeded initialisation) and fills them in.
"""
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import loralib
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes
from torch import nn

import vlcap
from vlcap.core import config as config_lib
from vlcap.core.atomic import atomic_write
from vlcap.core.config import CLASSIFIER_METHODS, ClassifierConfig
from vlcap.core.errors import VlcapError, few
from vlcap.core.model.encoder import create_vit, vit_transform
from vlcap.core.model.peft import seeded, swap_linear

FORMAT = "vlcap.classifier.v1"


class ViTClassifier(nn.Module):
    """``offline_hint``: what to do when the pretrained weights cannot be fetched."""

    def __init__(self, model_cfg, classes, offline_hint="pass --no-pretrained to start from random weights"):
        super().__init__()
        if model_cfg.method not in CLASSIFIER_METHODS:
            raise VlcapError(f"model.method={model_cfg.method!r}: choose one of {', '.join(CLASSIFIER_METHODS)}")
        if len(classes) < 2:
            raise VlcapError(f"a classifier needs at least two classes, got {len(classes)}: {few(classes)}")
        self.classes = list(classes)
        with seeded(model_cfg.init_seed):
            size = {} if model_cfg.img_size is None else {"img_size": model_cfg.img_size}
            self.vit = create_vit(model_cfg.encoder, model_cfg.pretrained, num_classes=len(classes),
                                  offline_hint=offline_hint, **size)
            if not hasattr(self.vit, "blocks") or not hasattr(self.vit, "patch_embed"):
                raise VlcapError(f"encoder '{model_cfg.encoder}' is not a ViT (no blocks/patch embedding); "
                                 "choose a timm ViT")
            choose_trainable(self.vit, model_cfg)

    def forward(self, pixels):
        return self.vit(pixels)

    def transform(self):
        return vit_transform(self.vit)


def choose_trainable(vit, model_cfg):
    """Freeze what ``model_cfg.method`` leaves as it was; add LoRA for ``lora``."""
    if model_cfg.method == "full":
        return
    vit.requires_grad_(False)
    if model_cfg.method == "lora":
        for block in vit.blocks:
            add_qv_lora(block.attn, model_cfg.lora_rank, model_cfg.lora_alpha)
    vit.get_classifier().requires_grad_(True)


def add_qv_lora(attn, rank, alpha):
    """LoRA (loralib) on the q and v thirds of ``attn.qkv``, the frozen weight shared. Never
    merged into the weight in eval mode: the frozen weight stays bit-identical, so trainable-only
    checkpoints and resumed runs stay exact."""
    qkv = getattr(attn, "qkv", None)
    if not isinstance(qkv, nn.Linear):
        raise VlcapError(f"LoRA needs timm's Attention with a fused qkv Linear, got {type(attn).__qualname__}; "
                         "use --method full or linear")
    if rank < 1:
        raise VlcapError(f"model.lora_rank must be >= 1, got {rank}")
    lora = loralib.MergedLinear(qkv.in_features, qkv.out_features, r=rank, lora_alpha=alpha,
                                enable_lora=[True, False, True], bias=qkv.bias is not None, merge_weights=False)
    swap_linear(attn, "qkv", lora)


def trainable_state(model):
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def save_classifier(path, model, cfg, record=None):
    """The trainable parameters of ``model`` with the metadata to rebuild it, atomically.
    ``record``: the training history record the weights were saved at. Returns the count."""
    tensors = {name: p.detach().to("cpu", copy=True).contiguous() for name, p in trainable_state(model).items()}
    count = sum(t.numel() for t in tensors.values())
    metadata = {"format": FORMAT, "config": json.dumps(config_lib.to_dict(cfg)),
                "classes": json.dumps(model.classes), "parameters": str(count), "vlcap_version": vlcap.__version__}
    if record is not None:
        metadata["training"] = json.dumps(record)
    with atomic_write(path) as f:
        f.write(safetensors_bytes(tensors, metadata=metadata))
    return count


@dataclass
class LoadedClassifier:
    model: ViTClassifier
    config: ClassifierConfig
    metadata: dict


def checkpoint_format(path):
    """The ``format`` a vlcap safetensors file declares in its header (None if it declares none),
    so a command taking either kind of checkpoint can tell a classifier from a captioner."""
    path = Path(path)
    if not path.is_file():
        raise VlcapError(f"{path}: checkpoint not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format")
    except (SafetensorError, OSError, ValueError) as exc:
        raise VlcapError(f"{path}: not a safetensors file ({exc}); pass a vlcap checkpoint") from None


def read_classifier_metadata(path):
    """``(metadata, shapes)`` of a classifier checkpoint; one line for anything else."""
    path = Path(path)
    if not path.is_file():
        raise VlcapError(f"{path}: classifier checkpoint not found; pass RUN/best.safetensors of vlcap train-classifier")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise VlcapError(f"{path}: not a safetensors file ({exc})") from None
    if metadata.get("format") != FORMAT:
        raise VlcapError(f"{path}: not a vlcap classifier checkpoint (format {metadata.get('format')!r}, "
                         f"expected {FORMAT}); pass RUN/best.safetensors of vlcap train-classifier")
    try:
        metadata["config"] = config_lib.from_dict(ClassifierConfig, json.loads(metadata["config"]), f"{path} metadata")
        metadata["classes"] = json.loads(metadata["classes"])
        if not isinstance(metadata["classes"], list) or not all(isinstance(c, str) for c in metadata["classes"]):
            raise ValueError("classes is not a list of names")
        metadata["training"] = json.loads(metadata.get("training", "null"))
        metadata["parameters"] = int(metadata["parameters"])
    except (KeyError, ValueError, TypeError) as exc:
        raise VlcapError(f"{path}: damaged classifier metadata ({type(exc).__name__}: {exc})") from None
    return metadata, shapes


def load_classifier(path, device="cpu"):
    """Rebuild the classifier a checkpoint describes and fill in its trained parameters, after
    checking every name and shape against the rebuilt model."""
    metadata, shapes = read_classifier_metadata(path)
    cfg = metadata["config"]
    model_cfg = cfg.model
    if model_cfg.method == "full":  # the file holds every weight: nothing to fetch
        model_cfg = dataclasses.replace(model_cfg, pretrained=False)
    model = ViTClassifier(model_cfg, metadata["classes"],
                          offline_hint=f"copy timm's cache from the machine that trained {path}")
    params = trainable_state(model)
    expected = {name: tuple(p.shape) for name, p in params.items()}
    if expected != shapes:
        differing = sorted(set(expected) ^ set(shapes) | {n for n in set(expected) & set(shapes)
                                                          if expected[n] != shapes[n]})
        raise VlcapError(f"{path}: its tensors do not fit the model its metadata describes ({few(differing)}); "
                         "the file is damaged or was edited")
    with safe_open(str(path), framework="pt") as f, torch.no_grad():
        for name, p in params.items():
            p.copy_(f.get_tensor(name))
    model.to(device).eval()
    return LoadedClassifier(model, cfg, metadata)
