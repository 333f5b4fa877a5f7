"""The state incremental decoding keeps between steps, so each step feeds only the new token.

Rows are laid out image-major: with ``beams`` rows per image, row ``b * beams + j`` is beam ``j``
of image ``b``. Per layer the cache holds

- the self-attention keys/values of every position so far, ``(rows, n_head, P + positions, head_dim)``,
  where a prefix-tuning method's ``kv_prefix`` occupies the first ``P`` slots from the start,
  followed by the positions of the decoder's ``input_prefix`` (prompt tuning), which ``build``
  runs through the decoder once (prefill) so decoding starts right after them;
- the cross-attention keys/values of the image tokens, ``(images, n_head, tokens, head_dim)``:
  computed once per image when the cache is built, always by running ``k`` and ``v`` on the
  image tokens (``CrossAttention.memory_kv``, whatever its ``form``; training runs them too only
  on the "project" form, which a method that hooks or replaces them sets), shared by all its beams
  (``gpt2.attend_shared_memory``), never copied by ``expand`` or ``reorder``.

Decoding strategies own the row layout: they call ``expand`` to turn one row per image into
``beams`` rows and ``reorder`` to move surviving beams into place after each step.
"""
import torch


class LayerCache:
    def __init__(self, cross_k, cross_v, self_k=None, self_v=None):
        self.cross_k, self.cross_v = cross_k, cross_v
        self.self_k, self.self_v = self_k, self_v

    def append_self_kv(self, k, v):
        """Append the new positions' keys/values; return all of them (past + new)."""
        if self.self_k is not None:
            # A prefix enters in its parameter dtype; under autocast the activations may differ.
            k = torch.cat([self.self_k.to(k.dtype), k], dim=2)
            v = torch.cat([self.self_v.to(v.dtype), v], dim=2)
        self.self_k, self.self_v = k, v
        return k, v


class DecoderCache:
    def __init__(self, layers):
        self.layers = layers
        self.positions = 0  # decoder positions seen so far: input prefix + text
        self.prefix_length = 0  # of which the decoder's input_prefix took

    @property
    def length(self):
        """Text tokens seen so far."""
        return self.positions - self.prefix_length

    @classmethod
    def build(cls, decoder, memory):
        """A cache for decoding ``memory`` (``(B, tokens, n_embd)``), one row per image, holding
        no text yet (but any input prefix, already run through the decoder)."""
        layers = []
        for block in decoder.h:
            layer = LayerCache(*block.cross_attn.memory_kv(memory))
            if block.attn.kv_prefix is not None:
                layer.self_k, layer.self_v = block.attn.kv_prefix(memory.size(0))
            layers.append(layer)
        cache = cls(layers)
        if decoder.input_prefix is not None:
            prefix = decoder.input_prefix(memory.size(0))
            decoder.transform(prefix.to(decoder.wte.weight.dtype), memory, cache)
            cache.prefix_length = prefix.size(1)
        return cache

    def _map_self_kv(self, fn):
        for layer in self.layers:
            if layer.self_k is not None:
                layer.self_k, layer.self_v = fn(layer.self_k), fn(layer.self_v)

    def expand(self, beams):
        """Each row becomes ``beams`` consecutive rows (the image keys/values stay shared)."""
        self._map_self_kv(lambda t: t.repeat_interleave(beams, dim=0))

    def reorder(self, index):
        """Row ``i`` takes the state of row ``index[i]``; rows must stay with their own image."""
        self._map_self_kv(lambda t: t.index_select(0, index))
