"""GPT-2 decoder with a cross-attention block per layer, loading the course's ``decoder_model.bin``.

Module names follow the course checkpoint (``wte``, ``wpe``, ``h.N.attn.c_attn``, ``h.N.mlp.c_fc``,
``ln_f``), so its state dict maps onto this model key for key. The added parts are
``h.N.ln_cross`` + ``h.N.cross_attn``; they are the only decoder parameters vlcap trains.
"""
import math
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import torch.utils.checkpoint
import torch.nn.functional as F
from torch import nn

from vlcap.core.config import GPT2Config
from vlcap.core.errors import VlcapError
from vlcap.core.model.course_weights import course_keys
from vlcap.core.model.tokenizer import IGNORE_INDEX


def split_heads(x, n_head):
    B, T, C = x.shape
    return x.view(B, T, n_head, C // n_head).transpose(1, 2)


def merge_heads(x):
    B, H, T, D = x.shape
    return x.transpose(1, 2).reshape(B, T, H * D)


class SelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        # Hook point for prefix-style methods: a callable ``batch_size -> (k, v)``, each
        # (B, n_head, P, head_dim), prepended to the keys/values and visible to every position.
        self.kv_prefix = None

    def forward(self, x, cache=None):
        q, k, v = self.c_attn(x).split(x.size(-1), dim=2)
        q, k, v = (split_heads(t, self.n_head) for t in (q, k, v))
        if cache is not None:  # incremental decoding: past keys/values (prefix included) are cached
            y = attend_after_past(q, *cache.append_self_kv(k, v))
        elif self.kv_prefix is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            pk, pv = self.kv_prefix(x.size(0))
            y = attend_after_past(q, torch.cat([pk.to(k.dtype), k], 2), torch.cat([pv.to(v.dtype), v], 2))
        return self.c_proj(merge_heads(y))


def attend_after_past(q, k, v):
    """Causal attention where the ``T`` queries are the last ``T`` of the ``S`` key positions:
    every earlier position (a prefix, the cached past) is visible to all of them."""
    T, S = q.size(2), k.size(2)
    mask = None if T == 1 else torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


# How training's cross-attention reaches the image tokens (``CrossAttention.form``):
# "auto"     in memory space (``attend_in_memory_space``: k and v are folded into the queries, their
#            forward never runs) when that takes fewer multiply-adds, else as "project";
# "project"  always run ``k`` and ``v`` on the image tokens, as the decoding cache does.
CROSS_ATTENTION_FORMS = ("auto", "project")


class CrossAttention(nn.Module):
    """Text positions attend to all image tokens (no mask: every image token is visible)."""

    def __init__(self, cfg):
        super().__init__()
        self.n_head = cfg.n_head
        self.q = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.k = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.v = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        # Zero output projection: a fresh captioner computes exactly the pretrained language
        # model, so training starts from GPT-2's fluency instead of from noise.
        nn.init.zeros_(self.c_proj.weight)
        nn.init.zeros_(self.c_proj.bias)
        # One of CROSS_ATTENTION_FORMS. "auto" reads k's and v's weights directly, so a method
        # that hooks, wraps or replaces k or v must set "project" (``peft.project_image_tokens``;
        # ``peft.swap_linear`` does it), or its change would act in decoding but not in training.
        self.form = "auto"

    def memory_kv(self, memory):
        """Keys and values of the image tokens, ``(B, n_head, tokens, head_dim)`` each."""
        return split_heads(self.k(memory), self.n_head), split_heads(self.v(memory), self.n_head)

    def forward(self, x, memory, cache=None, keep=None):
        """``keep``: a list that receives this call's attention weights (an ``AttentionProbe``'s)."""
        q = split_heads(self.q(x), self.n_head)
        if cache is not None:
            y = attend_shared_memory(q, cache.cross_k, cache.cross_v)
        elif keep is not None:
            y = attend_and_keep(q, *self.memory_kv(memory), keep)
        elif self.form == "auto" and self.memory_space_is_cheaper(q.size(2), memory.size(1)):
            y = self.attend_in_memory_space(q, memory)
        else:
            y = F.scaled_dot_product_attention(q, *self.memory_kv(memory))
        return self.c_proj(merge_heads(y))

    def memory_space_is_cheaper(self, T, N):
        """Whether ``attend_in_memory_space`` takes fewer multiply-adds than projecting the ``N``
        image tokens to keys and values, for ``T`` text positions (per image, key side; the value
        side is the same). It is while ``T < N C / (C + (n_head - 1) N)``: captions are short
        next to the image tokens, so in training it usually is."""
        C = self.k.in_features
        projecting = N * C * C + T * N * C  # keys of the N tokens, then T x N scores of head width
        in_memory_space = T * C * C + self.n_head * T * N * C  # queries to memory width, then scores at C
        return in_memory_space < projecting

    def attend_in_memory_space(self, q, memory):
        """What SDPA computes on ``memory_kv(memory)``, without projecting the image tokens.

        With ``k(m) = W_k m + b_k`` per head, ``q . k(m) = (W_kᵀ q) . m + q . b_k``: each head's
        query is taken to the memory's width and scores the image tokens themselves (``q . b_k`` is
        the same for every token; it is added anyway, so ``b_k`` gets the gradient it gets in the
        projecting form). The weights of a query sum to 1, so ``Σ a v(m) = W_v (Σ a m) + b_v``.
        The heads share the memory, so their queries are stacked on the time axis and attend in
        one batched matmul. Same result as the projecting form up to float rounding, with the
        cost ``memory_space_is_cheaper`` counts; and the trained projections' gradients no longer
        go back through N x C x C matmuls per layer. Only valid while k and v are the plain
        Linear layers whose weights it reads (see ``form``)."""
        B, H, T, D = q.shape
        w_k, w_v = self.k.weight.view(H, D, -1), self.v.weight.view(H, D, -1)  # (H, D, C)
        queries = torch.einsum("bhtd,hdc->bhtc", q, w_k).reshape(B, H * T, -1)
        bias_term = (q * self.k.bias.view(H, 1, D)).sum(-1).reshape(B, H * T, 1)
        scores = torch.baddbmm(bias_term, queries, memory.transpose(1, 2))
        weights = torch.softmax(scores.float() / math.sqrt(D), dim=-1).to(memory.dtype)
        mixed = torch.bmm(weights, memory).view(B, H, T, -1)  # (B, H, T, C): Σ a m per head
        y = torch.einsum("bhtc,hdc->bhtd", mixed, w_v)
        return y + self.v.bias.view(H, 1, D).to(y.dtype)


def attend_and_keep(q, k, v, keep):
    """What SDPA computes (no mask), with the weights ``(B, n_head, T, keys)`` appended to ``keep``."""
    weights = torch.softmax((q @ k.transpose(-2, -1)).float() / math.sqrt(q.size(-1)), dim=-1)
    keep.append(weights)
    return weights.to(v.dtype) @ v


def attend_shared_memory(q, k, v):
    """Cross-attention of ``R = B * beams`` rows (image-major) to ``B`` images' keys/values.

    Cross-attention has no mask, so the queries of all beams of one image can be stacked along
    the time axis and attend in one call to that image's keys/values, which are never copied.
    """
    B, H, N, D = k.shape
    R, _, T, _ = q.shape
    beams = R // B
    q = q.view(B, beams, H, T, D).transpose(1, 2).reshape(B, H, beams * T, D)
    y = F.scaled_dot_product_attention(q, k, v)
    return y.view(B, H, beams, T, D).transpose(1, 2).reshape(R, H, T, D)


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = SelfAttention(cfg)
        self.ln_cross = nn.LayerNorm(cfg.n_embd)
        self.cross_attn = CrossAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(cfg.n_embd, 4 * cfg.n_embd)),
            ("act", nn.GELU(approximate="tanh")),
            ("c_proj", nn.Linear(4 * cfg.n_embd, cfg.n_embd)),
        ]))
        # Hook points: each sub-layer's output passes through these before the residual add,
        # so a method can transform it (bottleneck adapters) without touching the sub-layer.
        self.post_attn = nn.Identity()
        self.post_cross_attn = nn.Identity()
        self.post_mlp = nn.Identity()

    def forward(self, x, memory, cache=None, keep=None):
        """``keep``: this layer's lists from an ``AttentionProbe`` (``AttentionProbe.at``)."""
        keep = keep or {}
        x = x + self.post_attn(self.attn(self.ln_1(x), cache))
        x = x + self.post_cross_attn(self.cross_attn(self.ln_cross(x), memory, cache, keep.get("cross")))
        return x + self.post_mlp(self.mlp(self.ln_2(x)))


@dataclass
class AttentionProbe:
    """A request to keep attention weights during a full-sequence forward, passed as
    ``GPT2Decoder.forward(..., probe=AttentionProbe([layer]))``: afterwards ``weights[layer]``
    holds one ``(B, n_head, T, keys)`` tensor per forward, computed as SDPA computes its output.
    ``kind`` says which attention: "cross" (keys: the image tokens). Each block hands its
    sub-layers the lists of ``at(i)`` by kind; a self-attention probe would add "self" to
    ``PROBED`` and have ``SelfAttention`` append to ``keep["self"]`` the same way."""
    layers: tuple
    kind: str = "cross"
    weights: dict = field(default_factory=dict, init=False)  # layer -> [weights of each forward]

    PROBED = ("cross",)

    def __post_init__(self):
        if self.kind not in self.PROBED:
            raise ValueError(f"attention probe kind {self.kind!r}: only {', '.join(self.PROBED)} can be probed")
        self.layers = tuple(self.layers)
        for layer in self.layers:
            self.weights.setdefault(layer, [])

    def at(self, layer):
        """What the block of ``layer`` keeps: ``{kind: list}``, or None when it is not probed."""
        return {self.kind: self.weights[layer]} if layer in self.layers else None


class GPT2Decoder(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as in GPT-2
        # train.grad_checkpointing: less memory, for a second forward of every block in backward.
        self.gradient_checkpointing = False
        # Hook point for prompt-style methods: a callable ``batch_size -> (B, P, n_embd)`` of input
        # embeddings placed before the token embeddings. They take positions 0..P-1 (the text
        # moves to P..P+T-1, as in HF peft's prompt tuning), every text position attends to them,
        # and their P outputs are dropped, so the logits still line up with the labels.
        self.input_prefix = None
        self._init_pretrained_like()

    def _init_pretrained_like(self):
        # GPT-2's init, except the token embeddings: they are drawn at the scale a *trained*
        # GPT-2 has (std ~ sqrt(16 / n_embd), 0.14 at 768). The LM head is tied to them and
        # frozen, so at GPT-2's 0.02 init a random decoder (the tiny preset) could never give a
        # confident prediction (max logit ~1) and nothing could be learned through it.
        for name, p in self.named_parameters():
            if ".cross_attn.c_proj" in name:
                continue  # zero on purpose, see CrossAttention
            if name == "wte.weight":
                nn.init.normal_(p, std=math.sqrt(16 / self.cfg.n_embd))
            elif name.endswith(".weight") and p.dim() == 2:
                std = 0.02 / math.sqrt(2 * self.cfg.n_layer) if name.endswith("c_proj.weight") else 0.02
                nn.init.normal_(p, std=std)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)

    def forward(self, input_ids, memory=None, cache=None, only=None, probe=None):
        """Logits ``(B, T, vocab)``. Training passes the whole sequence and the image tokens
        ``memory``; incremental decoding passes only the new tokens and a ``DecoderCache``
        (``vlcap.core.model.kv_cache``), which holds the image keys/values (and has already run any
        ``input_prefix``) and grows by ``T``. ``only``: a bool mask ``(B, T)``; the logits of
        just those positions come back, ``(N, vocab)`` (the LM head is 50257 wide, and the loss
        reads no logits where there is no label). ``probe``: an ``AttentionProbe`` that keeps
        the attention weights it names (full-sequence forwards only)."""
        x = self.wte(input_ids)
        P = 0
        if cache is None and self.input_prefix is not None:
            prefix = self.input_prefix(input_ids.size(0))
            x, P = torch.cat([prefix.to(x.dtype), x], dim=1), prefix.size(1)
        x = self.transform(x, memory, cache, probe)[:, P:]
        return self.lm_head(self.ln_f(x if only is None else x[only]))

    def next_token_loss(self, input_ids, labels, memory=None):
        """Token-mean cross-entropy against ``labels`` (``IGNORE_INDEX`` where there is none). The
        logits are computed only at labelled positions (every caption's last input and the padding
        have none): what ignore_index would average, without the LM head's work there."""
        labelled = labels != IGNORE_INDEX
        # Positions after the last label (the longest caption's final input, which predicts
        # nothing, and padding) cannot change any earlier position in a causal decoder: not run.
        used = labelled.any(0).nonzero()
        end = int(used[-1]) + 1 if len(used) else labels.size(1)
        labelled = labelled[:, :end]
        return F.cross_entropy(self(input_ids[:, :end], memory, only=labelled).float(), labels[:, :end][labelled])

    def transform(self, x, memory=None, cache=None, probe=None):
        """The transformer blocks on input embeddings ``x`` ``(B, T, n_embd)`` (position
        embeddings added here): hidden states before ``ln_f``. With a cache, positions continue
        after the ones it holds, and it grows by ``T``. ``probe``: see ``forward``."""
        past = 0 if cache is None else cache.positions
        T = x.size(1)
        if past + T > self.cfg.block_size:
            raise VlcapError(f"a sequence of {past + T} positions exceeds the decoder's context of "
                             f"{self.cfg.block_size}; lower --max-length (or the decoding option that sets the length)")
        if probe is not None:
            self.check_probe(probe, cache)
        x = x + self.wpe(torch.arange(past, past + T, device=x.device))
        for i, block in enumerate(self.h):
            if cache is not None:
                x = block(x, memory, cache.layers[i])
            elif probe is not None:  # not checkpointed: a recompute in backward would keep weights twice
                x = block(x, memory, keep=probe.at(i))
            elif self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                # Recompute the block's activations in backward instead of keeping them.
                x = torch.utils.checkpoint.checkpoint(block, x, memory, use_reentrant=False)
            else:
                x = block(x, memory)
        if cache is not None:
            cache.positions += T
        return x

    def check_probe(self, probe, cache):
        # A probe reads a full-sequence forward: the cache's path shares image keys/values
        # between beam rows and keeps nothing. Layers are indices as the caller resolved them.
        if cache is not None:
            raise ValueError("an attention probe reads a full-sequence forward, not incremental decoding with a cache")
        bad = [layer for layer in probe.layers if not 0 <= layer < self.cfg.n_layer]
        if bad:
            raise ValueError(f"attention probe layer(s) {bad}: the decoder has layers 0..{self.cfg.n_layer - 1}")

    def pretrained_parameters(self):
        """The parameters a ``decoder_model.bin`` provides (everything but the cross-attention)."""
        params = dict(self.named_parameters())
        return [params[key] for key in course_keys(self.cfg)]
