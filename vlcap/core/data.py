"""The course's COCO-style caption files and the datasets built on them.

Schema: ``{"annotations": [{"caption", "id", "image_id"}], "images": [{"file_name", "id"}]}``.
"""
import json
import os
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

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


def read_json(path, what, expected, hint=""):
    """The JSON value in ``path``, or one ``VlcapError`` line naming the file: not found (``what``
    names the file, ``hint`` says what to pass instead), unreadable, empty or not JSON
    (``expected`` describes the content it should have)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise VlcapError(f"{path}: {what} not found{hint}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise VlcapError(f"{path}: cannot read the {what} ({exc}); expected {expected}") from None
    if not text.strip():
        raise VlcapError(f"{path}: the {what} is empty; expected {expected}")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise VlcapError(f"{path}: not valid JSON ({exc}); expected {expected}") from None


def load_captions(json_path):
    path = Path(json_path)
    data = read_json(path, "caption file", "the course's COCO-style caption file")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(data.get("annotations"), list):
        raise VlcapError(f"{path}: expected {{\"images\": [...], \"annotations\": [...]}} (COCO-style captions)")
    try:
        image_entries = [(entry_id(item, "id"), entry_text(item, "file_name")) for item in data["images"]]
        captions = [(entry_id(a, "image_id"), entry_text(a, "caption")) for a in data["annotations"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise VlcapError(f"{path}: malformed entry ({type(exc).__name__}: {exc}); images need an integer id + "
                         "a file_name string, annotations need an integer image_id + a caption string") from None
    images = dict(image_entries)
    duplicates = [image_id for image_id, n in Counter(i for i, _ in image_entries).items() if n > 1]
    if duplicates:
        raise VlcapError(f"{path}: image id(s) listed more than once in 'images': {few(duplicates)}; "
                         "give every image one entry")
    # Predictions and references are keyed by file stem (the course's format), so two entries
    # with the same stem would silently share captions.
    stems = Counter(Path(name).stem for name in images.values())
    clashes = sorted(name for name in images.values() if stems[Path(name).stem] > 1)
    if clashes:
        raise VlcapError(f"{path}: file names listed more than once (or sharing a stem) in 'images': "
                         f"{few(clashes)}; give every image one entry")
    orphans = sorted({image_id for image_id, _ in captions} - set(images))
    if orphans:
        raise VlcapError(f"{path}: captions refer to image ids with no entry in 'images': {few(orphans)}")
    return CaptionSet(images, captions)


def entry_id(entry, key):
    value = entry[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{key} {value!r} is not an integer")
    return value


def entry_text(entry, key):
    value = entry[key]
    if not isinstance(value, str):
        raise TypeError(f"{key} {value!r} is not a string")
    return value


SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}  # 16-bit grey PNG/TIFF ("I" in older Pillow)
ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa"}


def to_rgb(image):
    """Any PIL image as 8-bit RGB. PIL's own ``convert("RGB")`` clips 16-bit grey at 255 (almost
    every pixel turns white) and keeps whatever colour sits under transparent pixels, so those
    two cases are handled here: 16-bit values are scaled to 8 bits, alpha is composited on white."""
    if image.mode in SIXTEEN_BIT_MODES:
        grey = np.asarray(image, dtype=np.float64) / 257.0
        image = Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8), "L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ALPHA_MODES:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image.convert("RGBA"))
    return image.convert("RGB")


def load_image(path):
    """An RGB image, or a ``VlcapError`` naming the file for anything unreadable: missing,
    truncated, not an image, or over PIL's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``,
    where PIL itself only warns up to twice that size)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                return to_rgb(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise VlcapError(f"{path}: refused as a possible decompression bomb ({exc})") from None
    except (OSError, ValueError, SyntaxError) as exc:  # PIL reports broken files as any of these
        raise VlcapError(f"{path}: unreadable image ({type(exc).__name__}: {exc})") from None


@dataclass(frozen=True)
class Unreadable:
    """Stands in for a dataset item whose image could not be read; collation drops it."""
    path: Path
    message: str  # names the file and what is wrong with it


def check_images_exist(caption_set, image_dir, json_path):
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise VlcapError(f"{image_dir}: image folder not found")
    missing = sorted(name for name in set(caption_set.images.values()) if not (image_dir / name).is_file())
    if missing:
        raise VlcapError(f"{json_path}: {len(missing)} image file(s) missing from {image_dir}: {few(missing)}")


class CaptionDataset(Dataset):
    """One item per caption: ``(pixels, input_ids, labels)`` with the course's targets, or
    ``Unreadable`` when the image cannot be read (training goes on without it).

    Empty (or whitespace-only) captions are left out and counted in ``empty``; captions longer
    than ``max_tokens`` are cut and counted in ``truncated``."""

    def __init__(self, caption_set, image_dir, transform, tokenizer, max_tokens):
        self.image_dir = Path(image_dir)
        self.transform = transform
        self.items = []
        self.truncated = self.empty = 0
        for image_id, text in caption_set.captions:
            if not text.strip():
                self.empty += 1
                continue
            input_ids, labels, truncated = tokenizer.training_pair(text, max_tokens)
            self.truncated += truncated
            self.items.append((caption_set.images[image_id], input_ids, labels))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        file_name, input_ids, labels = self.items[index]
        try:
            pixels = self.transform(load_image(self.image_dir / file_name))
        except VlcapError as exc:  # returned, not raised: a DataLoader worker would wrap it in a traceback
            return Unreadable(self.image_dir / file_name, str(exc))
        return pixels, torch.tensor(input_ids), torch.tensor(labels)


class ImageDataset(Dataset):
    """One item per image file: ``(pixels, index)``. An unreadable image raises a ``VlcapError``,
    or with ``skip_unreadable`` gives ``Unreadable`` (batch with ``collate_images``)."""

    def __init__(self, paths, transform, skip_unreadable=False):
        self.paths = [Path(p) for p in paths]
        self.transform = transform
        self.skip_unreadable = skip_unreadable

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        try:
            return self.transform(load_image(self.paths[index])), index
        except VlcapError as exc:
            if not self.skip_unreadable:
                raise
            return Unreadable(self.paths[index], str(exc))


def split_unreadable(batch):
    readable = [item for item in batch if not isinstance(item, Unreadable)]
    return readable, tuple(item for item in batch if isinstance(item, Unreadable))


class CaptionBatch(NamedTuple):
    pixels: Optional[torch.Tensor]  # None when every image of the batch was unreadable
    input_ids: Optional[torch.Tensor]
    labels: Optional[torch.Tensor]
    unreadable: tuple  # one message per dropped item


def collate_captions(batch, pad_id):
    """Pad inputs with ``pad_id`` (the end token, as the course does) and labels with IGNORE;
    unreadable items are dropped and reported in ``unreadable``."""
    batch, unreadable = split_unreadable(batch)
    unreadable = tuple(item.message for item in unreadable)
    if not batch:
        return CaptionBatch(None, None, None, unreadable)
    pixels, inputs, labels = zip(*batch)
    length = max(len(x) for x in inputs)
    input_ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    label_ids = torch.full((len(batch), length), IGNORE_INDEX, dtype=torch.long)
    for row, (x, y) in enumerate(zip(inputs, labels)):
        input_ids[row, :len(x)] = x
        label_ids[row, :len(y)] = y
    return CaptionBatch(torch.stack(pixels), input_ids, label_ids, unreadable)


def collate_images(batch):
    """``(pixels or None, indices, Unreadable items)`` for an ``ImageDataset(skip_unreadable=True)``."""
    batch, unreadable = split_unreadable(batch)
    if not batch:
        return None, [], unreadable
    pixels, indices = zip(*batch)
    return torch.stack(pixels), list(indices), unreadable


def image_loader(paths, transform, batch_size, device, num_workers=None, worker_init_fn=None):
    """Batches ``(pixels or None, indices, Unreadable items)`` of every image in ``paths``; an
    unreadable file is reported, not raised, so one broken image never stops a long run."""
    if num_workers is None:  # decoding JPEGs is the bottleneck once the model runs on a GPU
        num_workers = min(4, os.cpu_count() or 1) if device.type == "cuda" else 0
    return DataLoader(ImageDataset(paths, transform, skip_unreadable=True), batch_size=batch_size,
                      num_workers=num_workers, pin_memory=device.type == "cuda", collate_fn=collate_images,
                      worker_init_fn=worker_init_fn)


def find_images(folder, unique_stems=False):
    """The image files in ``folder`` (jpg/jpeg/png/webp, any case), sorted by name. With
    ``unique_stems`` (outputs keyed by file stem, as the course's captions are), two files with one
    stem are an error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise VlcapError(f"{folder}: image folder not found")
    paths = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise VlcapError(f"{folder}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in this folder")
    shared = sorted(stem for stem, n in Counter(p.stem for p in paths).items() if n > 1)
    if unique_stems and shared:
        raise VlcapError(f"{folder}: several images share the file stem(s) {few(shared)}; outputs are "
                         "keyed by stem, so rename or remove the duplicates")
    return paths
