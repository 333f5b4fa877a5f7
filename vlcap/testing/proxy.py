"""A ``NextToken`` model that exposes only the documented interface, checking every call: what
the kit's ``documented_interface`` check hands a decoding strategy."""
import torch


class InterfaceOnlyNextToken:
    """Wraps a real ``NextToken`` model. Anything not documented (the decoder, the cache) is an
    ``AttributeError`` naming the interface; ``ids`` must hold one row per current row, grow by
    whole steps and be integer tokens; ``reorder`` must keep rows with their own image."""

    __slots__ = ("_model", "_rows", "images", "device")

    def __init__(self, model):
        self._model = model
        self._rows = model.images
        self.images = model.images
        self.device = model.device

    def __getattr__(self, name):
        raise AttributeError(f"NextToken has no '{name}': a decoding strategy may use only logits(ids, hidden=...), "
                             "expand(beams), reorder(index), images and device (docs/plugins.md)")

    def logits(self, ids, hidden=False):
        if not isinstance(ids, torch.Tensor) or ids.dtype != torch.long or ids.dim() != 2:
            raise AssertionError(f"logits(ids): ids must be a (rows, T) LongTensor, got {getattr(ids, 'shape', ids)!r}")
        if ids.size(0) != self._rows:
            raise AssertionError(f"logits(ids): {ids.size(0)} rows, but the model holds {self._rows} "
                                 "(expand/reorder set the rows)")
        if not isinstance(hidden, bool):
            raise AssertionError("logits(ids, hidden=...): hidden must be True or False")
        return self._model.logits(ids, hidden=hidden)

    def expand(self, beams):
        if not isinstance(beams, int) or beams < 1:
            raise AssertionError(f"expand(beams): beams must be a positive int, got {beams!r}")
        self._model.expand(beams)
        self._rows *= beams

    def reorder(self, index):
        index = torch.as_tensor(index)
        if index.dim() != 1 or len(index) % self.images:
            raise AssertionError(f"reorder(index): index must give every image the same number of rows, "
                                 f"got {len(index)} rows for {self.images} images")
        per_image, before = len(index) // self.images, self._rows // self.images
        image_of_row = torch.arange(len(index), device=index.device) // per_image
        if bool(((index // before) != image_of_row).any()) or bool((index < 0).any()):
            raise AssertionError("reorder(index): rows must stay with their own image (image-major layout)")
        self._model.reorder(index)
        self._rows = len(index)
