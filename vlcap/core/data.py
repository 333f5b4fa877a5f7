"""The course's COCO-style caption files and the datasets built on them.

Schema: ``{"annotations": [{"caption", "id", "image_id"}], "images": [{"file_name", "id"}]}``.
"""
import csv
import io
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

from vlcap.core.errors import VlcapError, VlcapWarning, few

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}


@dataclass
class CaptionSet:
    images: dict  # image id -> file name
    captions: list  # (image id, caption text), in file order

    def references(self):
        """file stem -> its reference captions, for every image that has at least one (an image
        listed without captions cannot be scored, so it has no entry). Ordered as the course's
        evaluator builds them (first appearance in the annotations), which fixes the order CIDEr
        averages in. Training's validation, ``vlcap evaluate`` and ``visualize`` all use this."""
        references = {}
        for image_id, text in self.captions:
            references.setdefault(Path(self.images[image_id]).stem, []).append(text)
        return references


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
        data = json.loads(text)
        json.dumps(data, ensure_ascii=False).encode("utf-8")  # a lone surrogate escape (\ud800) is not text
    except json.JSONDecodeError as exc:
        raise VlcapError(f"{path}: not valid JSON ({exc}); expected {expected}") from None
    except UnicodeEncodeError:
        raise VlcapError(f"{path}: holds a string that is not valid Unicode (a lone surrogate escape such as "
                         f"\\ud800); expected {expected}") from None
    except ValueError as exc:  # e.g. an integer of thousands of digits
        raise VlcapError(f"{path}: not usable JSON ({exc}); expected {expected}") from None
    except RecursionError:
        raise VlcapError(f"{path}: nested too deeply to be JSON vlcap reads; expected {expected}") from None
    return data


def load_captions(json_path):
    path = Path(json_path)
    data = read_json(path, "caption file", "the course's COCO-style caption file")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(data.get("annotations"), list):
        raise VlcapError(f"{path}: expected {{\"images\": [...], \"annotations\": [...]}} (COCO-style captions)")
    try:
        image_entries = [(entry_id(item, "id"), entry_file_name(item)) for item in data["images"]]
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
        raise TypeError(f"{key} {repr(value)[:40]} is not an integer")
    if not -2 ** 63 <= value < 2 ** 63:
        raise ValueError(f"{key} {str(value)[:20]}... is not a 64-bit integer")
    return value


def entry_text(entry, key):
    value = entry[key]
    if not isinstance(value, str):
        raise TypeError(f"{key} {repr(value)[:40]} is not a string")
    return value


def entry_file_name(entry):
    """An image's ``file_name``: a path inside the images folder (no ``..``, not absolute)."""
    name = entry_text(entry, "file_name")
    parts = Path(name).parts
    if not name or Path(name).is_absolute() or ".." in parts or "\\" in name or "\0" in name:
        raise ValueError(f"file_name {name[:60]!r} leaves the images folder; give a name inside it")
    return name


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


def unreadable_images(paths):
    """``{path: message}`` for each image in ``paths`` that cannot be opened as an image (missing,
    not an image, a damaged header or PNG structure), checked without decoding the pixels, so a
    whole validation set is checked in seconds before training."""
    bad = {}
    for path in paths:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(path) as image:
                    image.verify()
        except Exception as exc:  # PIL reports broken files as many kinds of exception
            bad[path] = f"{path}: unreadable image ({type(exc).__name__}: {exc})"
    return bad


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


class ImageDataset(Dataset):
    """One item per image file: ``(pixels, index)``, or ``Unreadable`` when the image cannot be
    read (returned, not raised: a DataLoader worker would wrap it in a traceback; batch with
    ``collate_images``, and ``iterate_images`` applies the caller's policy)."""

    def __init__(self, paths, transform):
        self.paths = [Path(p) for p in paths]
        self.transform = transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        try:
            return self.transform(load_image(self.paths[index])), index
        except VlcapError as exc:
            return Unreadable(self.paths[index], str(exc))


def split_unreadable(batch):
    readable = [item for item in batch if not isinstance(item, Unreadable)]
    return readable, tuple(item for item in batch if isinstance(item, Unreadable))


def collate_images(batch):
    """``(pixels or None, indices, Unreadable items)`` for an ``ImageDataset``."""
    batch, unreadable = split_unreadable(batch)
    if not batch:
        return None, [], unreadable
    pixels, indices = zip(*batch)
    return torch.stack(pixels), list(indices), unreadable


class ImageBatch(NamedTuple):
    pixels: Optional[torch.Tensor]  # (B, 3, H, W) on the device; None when no image of the batch was readable
    indices: list  # positions in ``paths`` of the images in ``pixels``
    unreadable: tuple  # ``Unreadable`` items: the files of this batch that could not be read


SKIP, RAISE = "skip", "raise"  # what iterate_images does with an unreadable image


def iterate_images(paths, transform, batch_size, device, *, unreadable=SKIP, num_workers=None,
                   worker_init_fn=None):
    """Batches of every image in ``paths``, preprocessed by ``transform`` and moved to ``device``:
    the one image iterator of captioning, classification, CLIPScore, validation and the feature
    cache. ``unreadable``: ``"skip"`` reports each unreadable file in its batch's ``unreadable``
    and goes on (one broken image never stops a long run); ``"raise"`` stops at the first with
    one ``VlcapError`` line naming it. Decoding runs in ``num_workers`` processes (default: 0 on
    CPU, up to 4 on CUDA, where JPEG decoding becomes the bottleneck)."""
    if unreadable not in (SKIP, RAISE):
        raise ValueError(f"unreadable must be {SKIP!r} or {RAISE!r}, got {unreadable!r}")
    if batch_size < 1:
        raise VlcapError(f"batch size must be >= 1, got {batch_size}")
    if num_workers is None:
        num_workers = min(4, os.cpu_count() or 1) if device.type == "cuda" else 0
    loader = DataLoader(ImageDataset(paths, transform), batch_size=batch_size,
                        num_workers=num_workers, pin_memory=device.type == "cuda", collate_fn=collate_images,
                        worker_init_fn=worker_init_fn)
    for pixels, indices, bad in loader:
        if bad and unreadable == RAISE:
            raise VlcapError(f"{bad[0].message}; replace or remove it")
        yield ImageBatch(None if pixels is None else pixels.to(device, non_blocking=True), indices, bad)


def text_name(name):
    """A file name as text every output can hold: itself, or, where it is not valid UTF-8 (Python
    keeps such bytes as lone surrogates, which no UTF-8 file or terminal takes), its bytes with
    the invalid ones written as ``\\xNN``."""
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        try:
            return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        except UnicodeEncodeError:  # a surrogate that stands for no byte (from a JSON \\ud800 escape)
            return name.encode("utf-8", "backslashreplace").decode("utf-8")


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
    for path in paths:
        if text_name(path.name) != path.name:
            warnings.warn(f"{folder}: the file name {text_name(path.name)} is not valid UTF-8; its outputs are "
                          f"keyed {text_name(path.stem)!r}", VlcapWarning, stacklevel=2)
    shared = sorted(stem for stem, n in Counter(text_name(p.stem) for p in paths).items() if n > 1)
    if unique_stems and shared:
        raise VlcapError(f"{folder}: several images share the file stem(s) {few(shared)}; outputs are "
                         "keyed by stem, so rename or remove the duplicates")
    return paths


def read_filename_label_csv(path, what="labels file"):
    """``[(line number, file name, label text)]`` from a ``filename,label`` CSV (the course's
    val_gt.csv form), each field stripped; a missing or unreadable file, a missing header or an
    empty field is one line naming the file (``what``: how the caller's user knows it)."""
    path = Path(path)
    try:
        rows = list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8"))))
    except FileNotFoundError:
        raise VlcapError(f"{path}: {what} not found") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise VlcapError(f"{path}: not a readable CSV ({exc})") from None
    if not rows or not {"filename", "label"} <= set(rows[0]):
        raise VlcapError(f"{path}: expected a CSV with a 'filename,label' header and one row per image")
    out = []
    for line, row in enumerate(rows, start=2):
        name, label = (row.get("filename") or "").strip(), (row.get("label") or "").strip()
        if not name or not label:
            raise VlcapError(f"{path}:{line}: every row needs a file name and a label")
        out.append((line, name, label))
    return out
