"""The course's COCO-style caption files and the datasets built on them.

Schema: ``{"annotations": [{"caption", "id", "image_id"}], "images": [{"file_name", "id"}]}``.
"""
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from vlcap.core.errors import VlcapError, few
from vlcap.core.tokenizer import IGNORE_INDEX

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}


@dataclass
class CaptionSet:
    images: dict  # image id -> file name
    captions: list  # (image id, caption text), in file order

    def references(self):
        """file stem -> all captions of that image (the course's prediction keys are stems)."""
        refs = {Path(name).stem: [] for name in self.images.values()}
        for image_id, text in self.captions:
            refs[Path(self.images[image_id]).stem].append(text)
        return refs


def load_captions(json_path):
    path = Path(json_path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise VlcapError(f"{path}: caption file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise VlcapError(f"{path}: not valid JSON ({exc}); expected the course's COCO-style caption file") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(data.get("annotations"), list):
        raise VlcapError(f"{path}: expected {{\"images\": [...], \"annotations\": [...]}} (COCO-style captions)")
    try:
        images = {int(item["id"]): str(item["file_name"]) for item in data["images"]}
        captions = [(int(a["image_id"]), str(a["caption"])) for a in data["annotations"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise VlcapError(f"{path}: malformed entry ({type(exc).__name__}: {exc}); images need id + "
                         "file_name, annotations need image_id + caption") from None
    orphans = sorted({image_id for image_id, _ in captions} - set(images))
    if orphans:
        raise VlcapError(f"{path}: captions refer to image ids with no entry in 'images': {few(orphans)}")
    return CaptionSet(images, captions)


def load_image(path):
    with Image.open(path) as image:
        return image.convert("RGB")


def check_images_exist(caption_set, image_dir, json_path):
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise VlcapError(f"{image_dir}: image folder not found")
    missing = sorted(name for name in set(caption_set.images.values()) if not (image_dir / name).is_file())
    if missing:
        raise VlcapError(f"{json_path}: {len(missing)} image file(s) missing from {image_dir}: {few(missing)}")


class CaptionDataset(Dataset):
    """One item per caption: ``(pixels, input_ids, labels)`` with the course's targets."""

    def __init__(self, caption_set, image_dir, transform, tokenizer, max_tokens):
        self.image_dir = Path(image_dir)
        self.transform = transform
        self.items = []
        self.truncated = 0
        for image_id, text in caption_set.captions:
            input_ids, labels, truncated = tokenizer.training_pair(text, max_tokens)
            self.truncated += truncated
            self.items.append((caption_set.images[image_id], input_ids, labels))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        file_name, input_ids, labels = self.items[index]
        pixels = self.transform(load_image(self.image_dir / file_name))
        return pixels, torch.tensor(input_ids), torch.tensor(labels)


class ImageDataset(Dataset):
    """One item per image file: ``(pixels, file_stem)``."""

    def __init__(self, paths, transform):
        self.paths = [Path(p) for p in paths]
        self.transform = transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        return self.transform(load_image(self.paths[index])), self.paths[index].stem


def collate_captions(batch, pad_id):
    """Pad inputs with ``pad_id`` (the end token, as the course does) and labels with IGNORE."""
    pixels, inputs, labels = zip(*batch)
    length = max(len(x) for x in inputs)
    input_ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    label_ids = torch.full((len(batch), length), IGNORE_INDEX, dtype=torch.long)
    for row, (x, y) in enumerate(zip(inputs, labels)):
        input_ids[row, :len(x)] = x
        label_ids[row, :len(y)] = y
    return torch.stack(pixels), input_ids, label_ids
