"""The training datasets: one item per caption, from the images or from a feature cache, and the
collate function that pads a batch of captions."""
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from vlcap.core.data import Unreadable, load_image, split_unreadable
from vlcap.core.errors import VlcapError
from vlcap.core.model.tokenizer import IGNORE_INDEX


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


class CachedCaptionDataset(Dataset):
    """A ``CaptionDataset`` whose items carry the image's cached ViT tokens instead of pixels."""

    def __init__(self, captions, cache):
        self.items = captions.items
        self.truncated, self.empty = captions.truncated, captions.empty
        self.cache = cache

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        file_name, input_ids, labels = self.items[index]
        if file_name in self.cache.unreadable:  # skipped when the cache was built, as training skips it
            return Unreadable(Path(file_name), self.cache.unreadable[file_name])
        tokens = torch.from_numpy(self.cache.features[self.cache.rows[file_name]].astype(np.float32))
        return tokens, torch.tensor(input_ids), torch.tensor(labels)
