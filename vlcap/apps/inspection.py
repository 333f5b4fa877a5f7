"""``vlcap inspect``: what a vlcap checkpoint holds, read from its header (no tensor is loaded)."""
import math
from dataclasses import dataclass

from vlcap.core import config as config_lib
from vlcap.core.model.checkpoint import read_metadata
from vlcap.core.model.classifier import FORMAT as CLASSIFIER_FORMAT
from vlcap.core.model.classifier import checkpoint_format, read_classifier_metadata
from vlcap.core.model.peft import parameter_group


@dataclass
class CheckpointSummary:
    path: str  # as the caller named it
    metadata: dict  # the checkpoint's metadata as read_metadata parses it, without "shapes"
    shapes: dict  # tensor name -> shape
    groups: dict  # part of the captioner (parameter_group) -> parameters saved for it


def inspect_checkpoint(path):
    """The metadata, tensor shapes and per-part parameter counts of the checkpoint at ``path``
    (a one-line ``VlcapError`` when it is missing or not a vlcap checkpoint). A classifier's
    (``vlcap train-classifier``) parts are its ViT, its LoRA factors and its head."""
    if checkpoint_format(path) == CLASSIFIER_FORMAT:
        return inspect_classifier(path)
    metadata = read_metadata(path)
    shapes = metadata.pop("shapes")
    groups = {}
    for name, shape in shapes.items():
        group = parameter_group(name)
        groups[group] = groups.get(group, 0) + math.prod(shape)
    return CheckpointSummary(str(path), metadata, shapes, groups)


def inspect_classifier(path):
    metadata, shapes = read_classifier_metadata(path)
    metadata["config"] = config_lib.to_dict(metadata["config"])
    groups = {}
    for name, shape in shapes.items():
        group = "lora" if ".lora_" in name else "head" if name.startswith("vit.head.") else "vit"
        groups[group] = groups.get(group, 0) + math.prod(shape)
    return CheckpointSummary(str(path), metadata, shapes, groups)
