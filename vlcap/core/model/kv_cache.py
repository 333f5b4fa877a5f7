"""The state incremental decoding keeps between steps, so each step feeds only the new token.

Rows are laid out image-major: with ``beams`` rows per image, row ``b * beams + j`` is beam ``j``
of image ``b``. Per layer the cache holds

- the shared self-attention past, ``(images, n_head, S, head_dim)``, one per image, never copied
  per beam (``gpt2.attend_shared_past``): a prefix-tuning method's ``kv_prefix`` from the start,
  then the keys/values of everything the decoder puts before the text (``prefill_inputs``: the
  prompt of an ``input_prefix``, the image tokens of an ``image_prefix``), which ``build`` runs
  through the decoder once (prefill) so decoding starts right after them;
- each row's own self-attention keys/values of the text so far, ``(rows, n_head, T, head_dim)``;
- in a block with cross-attention, the image tokens' cross-attention keys/values,
  ``(images, n_head, tokens, head_dim)``: computed once per image when the cache is built, always
  by running ``k`` and ``v`` on the image tokens (``CrossAttention.memory_kv``, whatever its
  ``form``; training runs them too only on the "project" form, which a method that hooks or
  replaces them sets), shared by all its beams (``gpt2.attend_shared_memory``).

Decoding strategies own the row layout: they call ``expand`` to turn one row per image into
``beams`` rows and ``reorder`` to move surviving beams into place after each step; both touch
only the rows' own keys/values.
"""
import torch


class LayerCache:
    def __init__(self, cross_k=None, cross_v=None):
        self.cross_k, self.cross_v = cross_k, cross_v
        self.shared_k = self.shared_v = None  # per image: kv_prefix + prefilled positions
        self.self_k = self.self_v = None  # per row: the text
        self.prefilling = False  # while True, new positions join the shared past

    def append_self_kv(self, k, v):
        """Append the new positions' keys/values; return ``(shared, own)``: the shared past and
        the row's own positions (past + new), each a ``(k, v)`` pair or None. While prefilling,
        the new positions join the shared past and ``own`` is None."""
        if self.prefilling:
            self.shared_k, self.shared_v = concat(self.shared_k, k), concat(self.shared_v, v)
            return (self.shared_k, self.shared_v), None
        self.self_k, self.self_v = concat(self.self_k, k), concat(self.self_v, v)
        if self.shared_k is None:
            return (self.self_k, self.self_v), None
        return (self.shared_k.to(k.dtype), self.shared_v.to(v.dtype)), (self.self_k, self.self_v)


def concat(past, new):
    # A prefix enters in its parameter dtype; under autocast the activations may differ.
    return new if past is None else torch.cat([past.to(new.dtype), new], dim=2)


class DecoderCache:
    def __init__(self, layers):
        self.layers = layers
        self.positions = 0  # sequence positions seen so far: prefill + text
        self.next_position = 0  # the next text position's wpe index
        self.prefix_length = 0  # of the positions, how many the prefill took

    @property
    def length(self):
        """Text tokens seen so far."""
        return self.positions - self.prefix_length

    @classmethod
    def build(cls, decoder, memory):
        """A cache for decoding ``memory`` (``(B, tokens, n_embd)``), one row per image, holding
        no text yet (but whatever comes before it, already run through the decoder)."""
        layers = []
        for block in decoder.h:
            cross = block.cross_attn.memory_kv(memory) if block.cross_attn is not None else (None, None)
            layer = LayerCache(*cross)
            if block.attn.kv_prefix is not None:
                layer.shared_k, layer.shared_v = block.attn.kv_prefix(memory.size(0))
            layers.append(layer)
        cache = cls(layers)
        prefix, positions, first = decoder.prefill_inputs(memory, memory.size(0))
        if prefix is not None:
            cache.set_prefilling(True)
            decoder.transform(prefix, memory, cache, positions=positions)
            cache.set_prefilling(False)
            cache.prefix_length, cache.next_position = prefix.size(1), first
        return cache

    def set_prefilling(self, on):
        for layer in self.layers:
            layer.prefilling = on

    def _map_self_kv(self, fn):
        for layer in self.layers:
            if layer.self_k is not None:
                layer.self_k, layer.self_v = fn(layer.self_k), fn(layer.self_v)

    def expand(self, beams):
        """Each row becomes ``beams`` consecutive rows (everything shared per image stays so)."""
        self._map_self_kv(lambda t: t.repeat_interleave(beams, dim=0))

    def reorder(self, index):
        """Row ``i`` takes the state of row ``index[i]``; rows must stay with their own image."""
        self._map_self_kv(lambda t: t.index_select(0, index))
