"""Cross-attention weights on request: which image tokens each produced token looked at.

Decoding never records anything (and pays nothing for it). Decoding is deterministic given the
tokens it produced and the decoder is causal, so one teacher-forced forward of ``[start] +
tokens``, with an ``AttentionProbe`` (``gpt2``) on the layer, recomputes exactly the
cross-attention every token saw while it was decoded, whatever the strategy (greedy, sampling, the winning beam of a beam search). The weights at input
position t are the ones that predicted token t+1: the k-th produced token's map comes from
position k-1, and the end token's map is never needed.
"""
from dataclasses import dataclass

import torch

from vlcap.core.errors import VlcapError
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


def token_attention(captioner, pixels, tokens, start_id, layer, head=None):
    """``(len(tokens), image tokens)``: the cross-attention of decoder layer ``layer`` (head
    ``head``, None: the mean over heads) over the image tokens while each of ``tokens`` was
    predicted for the preprocessed image ``pixels`` ``(3, H, W)``. Rows sum to 1."""
    if not tokens:
        return torch.zeros(0, captioner.encoder.num_tokens)
    block_size = captioner.decoder.cfg.block_size
    if len(tokens) > block_size:
        raise VlcapError(f"a caption of {len(tokens)} tokens does not fit the decoder's context of {block_size}")
    with evaluating(captioner), torch.inference_mode():
        memory = captioner.encode(pixels[None])
        ids = torch.tensor([[start_id, *tokens[:-1]]], device=pixels.device)
        probe = AttentionProbe([layer])
        captioner.decoder(ids, memory, probe=probe)
    weights = probe.weights[layer][0][0]  # (heads, T, image tokens)
    weights = weights.mean(0) if head is None else weights[head]
    return weights.float().cpu()


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


def patch_grid(weights, encoder):
    """``(n, image tokens)`` -> ``(n, rows, cols)`` over the patch grid: the leading CLS/register
    tokens (``encoder.num_prefix_tokens``) are dropped, the patches follow in raster order."""
    if weights.size(-1) != encoder.num_tokens:
        raise ValueError(f"{weights.size(-1)} image tokens, but the encoder makes {encoder.num_tokens}")
    return weights[:, encoder.num_prefix_tokens:].reshape(-1, *encoder.grid_size)
