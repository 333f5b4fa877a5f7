"""Attention weights on request: which image tokens each produced token looked at.

Decoding never records anything (and pays nothing for it). Decoding is deterministic given the
tokens it produced and the decoder is causal, so one teacher-forced forward of ``[start] +
tokens``, with an ``AttentionProbe`` (``gpt2``) on the layer, recomputes exactly the attention
every token saw while it was decoded, whatever the strategy (greedy, sampling, the winning beam
of a beam search). The weights at input position t are the ones that predicted token t+1: the
k-th produced token's map comes from position k-1, and the end token's map is never needed.

Which attention: a layer with cross-attention (the cross-attention connector) shows it; in a
decoder that reads the image tokens in its input sequence (the visual-tokens connector) it is the
self-attention from each text position to the image-token positions, renormalised over them (the
rest goes to the text and any prompt; its share of the whole is kept as ``image_share``).
"""
from dataclasses import dataclass

import torch

from vlcap.core.errors import VlcapError
from vlcap.core.model.captioner import prefill_length
from vlcap.core.model.gpt2 import AttentionProbe
from vlcap.core.runtime import evaluating


def check_layer(layer, n_layer):
    """``--layer`` as a non-negative index; negative values count from the last layer."""
    if not -n_layer <= layer < n_layer:
        raise VlcapError(f"--layer: the decoder has {n_layer} layers, so give {-n_layer}..{n_layer - 1} "
                         f"(-1 is the last), got {layer}")
    return layer % n_layer


def parse_head(head, n_head=None):
    """``--head``: ``"mean"`` (average over heads, returned as None) or a head index below ``n_head``."""
    if str(head) == "mean":
        return None
    try:
        index = int(head)
    except ValueError:
        raise VlcapError(f"--head: give 'mean' or a head index, got {head!r}") from None
    if index < 0 or (n_head is not None and index >= n_head):
        limit = f"0..{n_head - 1}" if n_head is not None else "an index >= 0"
        raise VlcapError(f"--head: the decoder has {n_head} heads per layer, so give 'mean' or {limit}, got {index}")
    return index


def probed_attention(captioner, layer):
    """"cross" or "self": the attention of ``layer`` that reads the image tokens."""
    decoder = captioner.decoder
    if decoder.h[layer].cross_attn is not None:
        return "cross"
    if decoder.image_prefix is not None:
        return "self"
    crossed = [i for i, block in enumerate(decoder.h) if block.cross_attn is not None]
    raise VlcapError(f"--layer {layer}: that decoder layer has no cross-attention and the image tokens are not in "
                     f"its input; give one of the layers with cross-attention: {crossed}")


def token_attention(captioner, pixels, tokens, start_id, layer, head=None):
    """``(weights, image_share)``: ``weights`` ``(len(tokens), image tokens)`` is the attention of
    decoder layer ``layer`` (head ``head``, None: the mean over heads) over the image tokens while
    each of ``tokens`` was predicted for the preprocessed image ``pixels`` ``(3, H, W)``, rows
    summing to 1; ``image_share`` ``(len(tokens),)`` is the part of that attention that went to the
    image tokens at all (None for cross-attention, which attends to nothing else)."""
    kind = probed_attention(captioner, layer)
    block_size, before = captioner.decoder.cfg.block_size, prefill_length(captioner)
    if before + len(tokens) > block_size:
        after = f" after {before} positions of image tokens and prompt" if before else ""
        raise VlcapError(f"a caption of {len(tokens)} tokens does not fit the decoder's context of {block_size}{after}")
    if not tokens:
        return torch.zeros(0, captioner.image_tokens.count), None if kind == "cross" else torch.zeros(0)
    with evaluating(captioner), torch.inference_mode():
        memory = captioner.encode(pixels[None])
        ids = torch.tensor([[start_id, *tokens[:-1]]], device=pixels.device)
        probe = AttentionProbe([layer], kind=kind)
        captioner.decoder(ids, memory, probe=probe)
    weights = probe.weights[layer][0][0]  # (heads, queries, keys)
    weights = (weights.mean(0) if head is None else weights[head]).float().cpu()
    if kind == "cross":
        return weights, None
    # The image tokens sit right before the text: the last T queries are the text's, and the
    # M keys before the last T are the image tokens (any kv prefix and prompt come earlier).
    T, M = ids.size(1), memory.size(1)
    image = weights[-T:, weights.size(1) - T - M:weights.size(1) - T]
    share = image.sum(-1)
    return image / share.clamp(min=torch.finfo(image.dtype).tiny).unsqueeze(-1), share


@dataclass
class Word:
    text: str
    pieces: list  # indices of its tokens in the produced sequence


def group_words(tokenizer, tokens, pieces=False):
    """The produced tokens as words. GPT-2's BPE marks a word's start with a leading space, so
    a token starting with whitespace begins a new word and any other token (a suffix, a
    punctuation mark) continues the current one; a lone space token joins the word after it.
    ``pieces=True`` keeps one entry per token. Texts are decoded from the whole group, so a
    character split over several byte tokens reads right."""
    groups, texts = [], []  # token indices and bytes of each word
    for index, token in enumerate(tokens):
        piece = tokenizer.encoding.decode_single_token_bytes(token)
        if not groups or pieces or (piece[:1].isspace() and texts[-1].strip()):
            groups.append([index])
            texts.append(piece)
        else:
            groups[-1].append(index)
            texts[-1] += piece
    return [Word(text.decode("utf-8", errors="replace").strip(), group) for group, text in zip(groups, texts)]


def word_attention(weights, words):
    """``(len(words), image tokens)``: each word's map is the mean of its pieces' maps, so it
    stays a distribution over the image tokens."""
    if not words:
        return weights.new_zeros(0, weights.size(-1))
    return torch.stack([weights[word.pieces].mean(0) for word in words])


def patch_grid(weights, image_tokens):
    """``(n, image tokens)`` -> ``(n, rows, cols)`` over the patch grid of ``image_tokens`` (a
    captioner's ``ImageTokens``: the encoder's grid, or the grid a connector pooled it to): the
    leading CLS/register tokens are dropped, the patches follow in raster order."""
    if weights.size(-1) != image_tokens.count:
        raise ValueError(f"{weights.size(-1)} image tokens, but the connector makes {image_tokens.count}")
    return weights[:, image_tokens.prefix:].reshape(-1, *image_tokens.grid)
