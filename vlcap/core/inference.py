"""Caption a folder of images with a trained checkpoint (what `vlcap caption` and hw3_2.sh run)."""
import json
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from vlcap.core.atomic import atomic_write
from vlcap.core.checkpoint import load_checkpoint
from vlcap.core.config import plugin_config
from vlcap.core.data import IMAGE_SUFFIXES, load_image
from vlcap.core.decoding import caption_images
from vlcap.core.errors import VlcapError, few
from vlcap.core.trainer import autocast_dtype, resolve_device


@dataclass
class FolderCaptions:
    predictions: dict  # file stem -> caption
    bad_images: list  # (path, reason) of the files that could not be read


def find_images(folder):
    """The image files in ``folder`` (by suffix, any case), sorted; their stems must be unique
    because predictions are keyed by stem."""
    folder = Path(folder)
    if not folder.is_dir():
        raise VlcapError(f"{folder}: image folder not found")
    paths = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise VlcapError(f"{folder}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in this folder")
    shared = sorted(stem for stem, n in Counter(p.stem for p in paths).items() if n > 1)
    if shared:
        raise VlcapError(f"{folder}: several images share the file stem(s) {few(shared)}; predictions are "
                         "keyed by stem, so rename or remove the duplicates")
    return paths


def decoding_choice(decoding_cfg, strategy, options):
    """(strategy name, options): the checkpoint's decoding config, overridden by the caller's.
    The checkpoint's options only carry over when the strategy is the same."""
    name = strategy or decoding_cfg.strategy
    base = decoding_cfg.options if name == decoding_cfg.strategy else {}
    return name, {**base, **(options or {})}


def caption_folder(images_dir, checkpoint, out, registry, *, decoder_weights=None, strategy=None, options=None,
                   max_length=None, batch_size=32, device="auto", console=None):
    """Caption every image in ``images_dir`` and write ``{stem: caption}`` to ``out`` atomically.
    Unreadable images get a warning line each and are left out (returned in ``bad_images``)."""
    console = console or Console(stderr=True)
    if batch_size < 1:
        raise VlcapError(f"--batch-size: must be >= 1, got {batch_size}")
    paths = find_images(images_dir)
    device = resolve_device(device)
    loaded = load_checkpoint(checkpoint, registry, decoder_weights=decoder_weights, device=device)
    name, options = decoding_choice(loaded.config.decoding, strategy, options)
    decoding = registry.get("decoding", name)
    plugin_config(decoding, options, "decoding.options")  # a bad option fails before any work
    max_length = max_length or loaded.config.decoding.max_length
    dtype = autocast_dtype(loaded.config.train.amp, device)
    transform = loaded.captioner.encoder.transform()

    def read(path):
        try:
            return transform(load_image(path)), None
        except (OSError, ValueError, SyntaxError) as exc:  # what PIL raises for damaged/unknown files
            return None, str(exc).splitlines()[0] if str(exc) else type(exc).__name__

    predictions, bad = {}, []
    columns = (TextColumn("captioning"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console) as progress, ThreadPoolExecutor(max_workers=4) as pool:
        task = progress.add_task("captioning", total=len(paths))
        for start in range(0, len(paths), batch_size):
            batch = paths[start:start + batch_size]
            pixels, stems = [], []
            for path, (image, reason) in zip(batch, pool.map(read, batch)):
                if image is None:
                    progress.console.print(f"warning: {path}: unreadable image ({reason}); skipped",
                                           markup=False, highlight=False, soft_wrap=True)
                    bad.append((path, reason))
                else:
                    pixels.append(image)
                    stems.append(path.stem)
            if pixels:
                with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                    captions = caption_images(loaded.captioner, torch.stack(pixels).to(device), loaded.tokenizer,
                                              decoding, options, max_length)
                predictions.update(zip(stems, captions))
            progress.advance(task, len(batch))
    with atomic_write(out, "w") as f:
        json.dump(predictions, f, indent=2, ensure_ascii=False)
    return FolderCaptions(predictions, bad)
