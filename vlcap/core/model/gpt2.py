"""GPT-2 decoder loading the course's ``decoder_model.bin``, with the slots a connector joins the image through.

Module names follow the course checkpoint (``wte``, ``wpe``, ``h.N.attn.c_attn``, ``h.N.mlp.c_fc``,
``ln_f``), so its state dict maps onto this model key for key. A connector plugin joins the image
tokens (``memory``) in one or both of two ways: ``add_cross_attention`` gives a block
``h.N.ln_cross`` + ``h.N.cross_attn`` (the course's 2023 design), and ``decoder.image_prefix``
(an ``ImagePrefix``) places the image tokens in the input sequence right before the text (ClipCap,
LLaVA), where the decoder's own self-attention reads them.
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


# How to make a sequence fit the decoder's context (the end of the one-line error).
FIT_HINT = ("shorten the captions (data.max_caption_tokens, decoding.max_length) or what comes before "
            "them (the connector's image tokens, a prompt)")


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

    def forward(self, x, cache=None, keep=None):
        """``keep``: a list that receives this call's attention weights (an ``AttentionProbe``'s)."""
        q, k, v = self.c_attn(x).split(x.size(-1), dim=2)
        q, k, v = (split_heads(t, self.n_head) for t in (q, k, v))
        if cache is not None:  # incremental decoding: past keys/values (prefix included) are cached
            shared, own = cache.append_self_kv(k, v)
            y = attend_after_past(q, *shared) if own is None else attend_shared_past(q, shared, own)
        else:
            if self.kv_prefix is not None:
                pk, pv = self.kv_prefix(x.size(0))
                k, v = torch.cat([pk.to(k.dtype), k], 2), torch.cat([pv.to(v.dtype), v], 2)
            if keep is not None:
                y = attend_and_keep(q, k, v, keep, causal_mask(q.size(2), k.size(2), q.device))
            elif k.size(2) == q.size(2):
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:
                y = attend_after_past(q, k, v)
        return self.c_proj(merge_heads(y))


def causal_mask(T, S, device):
    """``(T, S)`` bool: the ``T`` queries are the last ``T`` of the ``S`` key positions."""
    return torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=S - T)


def attend_after_past(q, k, v):
    """Causal attention where the ``T`` queries are the last ``T`` of the ``S`` key positions:
    every earlier position (a prefix, the cached past) is visible to all of them."""
    T, S = q.size(2), k.size(2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=None if T == 1 else causal_mask(T, S, q.device))


def attend_shared_past(q, shared, own):
    """Self-attention of ``R = B * beams`` rows (image-major) over a past shared by the beams of
    each image, then each row's own positions, causally.

    ``shared``: ``(k, v)``, each ``(B, n_head, S, head_dim)``: the positions prefilled once per
    image (a prefix, the prompt, the image tokens), never copied per beam; ``own``: ``(k, v)``,
    each ``(R, n_head, O, head_dim)``, whose last ``T`` positions are the queries'. One softmax
    runs over both parts, so the result is what attention over their concatenation gives."""
    (sk, sv), (ok, ov) = shared, own
    B, H, S, D = sk.shape
    R, _, T, _ = q.shape
    beams = R // B

    def per_image(t):  # (R, H, T, X) -> (B, H, beams * T, X): one image's beams side by side
        return t.reshape(B, beams, H, T, -1).transpose(1, 2).reshape(B, H, beams * T, -1)

    def per_row(t):  # the inverse
        return t.reshape(B, H, beams, T, -1).transpose(1, 2).reshape(R, H, T, -1)

    shared_scores = per_row(per_image(q) @ sk.transpose(-2, -1))
    own_scores = (q @ ok.transpose(-2, -1)).masked_fill(~causal_mask(T, ok.size(2), q.device), float("-inf"))
    weights = torch.softmax(torch.cat([shared_scores, own_scores], -1).float() / math.sqrt(D), dim=-1).to(q.dtype)
    return per_row(per_image(weights[..., :S]) @ sv) + weights[..., S:] @ ov


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
        for layer in (self.q, self.k, self.v):  # GPT-2's init
            nn.init.normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)
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


def attend_and_keep(q, k, v, keep, mask=None):
    """What SDPA computes (``mask``: bool ``(T, keys)``, True where a query may attend), with the
    weights ``(B, n_head, T, keys)`` appended to ``keep``."""
    scores = q @ k.transpose(-2, -1)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores.float() / math.sqrt(q.size(-1)), dim=-1)
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
        # A connector's slots (``add_cross_attention``): None in a block without cross-attention.
        self.ln_cross = None
        self.cross_attn = None
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
        x = x + self.post_attn(self.attn(self.ln_1(x), cache, keep.get("self")))
        if self.cross_attn is not None:
            x = x + self.post_cross_attn(self.cross_attn(self.ln_cross(x), memory, cache, keep.get("cross")))
        return x + self.post_mlp(self.mlp(self.ln_2(x)))


def add_cross_attention(block, cfg):
    """Give ``block`` (a ``decoder.h[i]``) a cross-attention sub-layer over the image tokens,
    between its self-attention and MLP: ``ln_cross`` + ``cross_attn`` (zero output projection, so
    the block's output is unchanged until it trains). Returns the ``CrossAttention``."""
    device = block.ln_1.weight.device
    block.ln_cross = nn.LayerNorm(cfg.n_embd, device=device)
    block.cross_attn = CrossAttention(cfg).to(device)
    return block.cross_attn


@dataclass(frozen=True)
class ImagePrefix:
    """``decoder.image_prefix``: the image tokens go into the input sequence right before the
    text (after any ``input_prefix``), read by the decoder's self-attention; their outputs are
    dropped before ``ln_f``, so the LM head and the loss see text positions only.
    ``position_embeddings``: whether they take GPT-2 positions (the text then starts after
    them) or none (the text keeps the positions it has without an image)."""
    position_embeddings: bool = True


@dataclass
class AttentionProbe:
    """A request to keep attention weights during a full-sequence forward, passed as
    ``GPT2Decoder.forward(..., probe=AttentionProbe([layer]))``: afterwards ``weights[layer]``
    holds one ``(B, n_head, T, keys)`` tensor per forward, computed as SDPA computes its output.
    ``kind`` says which attention: "cross" (keys: the image tokens) or "self" (keys: any
    ``kv_prefix``, then every position of the input sequence, image tokens included; queries:
    every position of the sequence). Each block hands its sub-layers the lists of ``at(i)`` by kind."""
    layers: tuple
    kind: str = "cross"
    weights: dict = field(default_factory=dict, init=False)  # layer -> [weights of each forward]

    PROBED = ("cross", "self")

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
        # A connector's slot: None, or an ``ImagePrefix``: the image tokens (``memory``) are placed
        # after any input prefix, right before the text.
        self.image_prefix = None
        self._init_pretrained_like()

    def _init_pretrained_like(self):
        # GPT-2's init, except the token embeddings: they are drawn at the scale a *trained*
        # GPT-2 has (std ~ sqrt(16 / n_embd), 0.14 at 768). The LM head is tied to them and
        # frozen, so at GPT-2's 0.02 init a random decoder (the tiny preset) could never give a
        # confident prediction (max logit ~1) and nothing could be learned through it.
        for name, p in self.named_parameters():
            if name == "wte.weight":
                nn.init.normal_(p, std=math.sqrt(16 / self.cfg.n_embd))
            elif name.endswith(".weight") and p.dim() == 2:
                std = 0.02 / math.sqrt(2 * self.cfg.n_layer) if name.endswith("c_proj.weight") else 0.02
                nn.init.normal_(p, std=std)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)

    def forward(self, input_ids, memory=None, cache=None, only=None, probe=None, hidden=False):
        """Logits ``(B, T, vocab)``. Training passes the whole sequence and the image tokens
        ``memory``; incremental decoding passes only the new tokens and a ``DecoderCache``
        (``vlcap.core.model.kv_cache``), which holds the image keys/values (and has already run
        whatever comes before the text, ``prefill_inputs``) and grows by ``T``. ``only``: a bool
        mask ``(B, T)``; the logits of just those positions come back, ``(N, vocab)`` (the LM
        head is 50257 wide, and the loss reads no logits where there is no label). ``probe``: an
        ``AttentionProbe`` that keeps the attention weights it names (full-sequence forwards only).
        ``hidden``: return ``(logits, states)``, ``states`` being the final hidden states (after
        ``ln_f``, what the LM head reads) at the same positions: computed anyway, so free."""
        x = self.wte(input_ids)
        P, positions = 0, None
        if cache is None:
            prefix, prefix_positions, first = self.prefill_inputs(memory, input_ids.size(0))
            if prefix is not None:
                x, P = torch.cat([prefix.to(x.dtype), x], dim=1), prefix.size(1)
                text = torch.arange(first, first + input_ids.size(1), device=x.device)
                positions = torch.cat([prefix_positions, text])
        # Everything before the text (prompt, image tokens) is dropped here: ln_f, the LM head
        # and the loss see text positions only.
        x = self.transform(x, memory, cache, probe, positions)[:, P:]
        states = self.ln_f(x if only is None else x[only])
        logits = self.lm_head(states)
        return (logits, states) if hidden else logits

    def prefill_inputs(self, memory, batch_size):
        """What goes before the text, ``(embeddings (B, P, n_embd), their wpe indices (P,) with -1
        for none, the text's first wpe index)``, or ``(None, None, 0)``: the ``input_prefix``
        (positions 0..), then the image tokens when ``image_prefix`` places them in the sequence."""
        parts, positions, first = [], [], 0
        if self.input_prefix is not None:
            prompt = self.input_prefix(batch_size)
            parts.append(prompt)
            positions.append(torch.arange(prompt.size(1)))
            first = prompt.size(1)
        if self.image_prefix is not None and memory is not None:
            parts.append(memory)
            if self.image_prefix.position_embeddings:
                positions.append(torch.arange(first, first + memory.size(1)))
                first += memory.size(1)
            else:
                positions.append(torch.full((memory.size(1),), -1))
        if not parts:
            return None, None, 0
        dtype = self.wte.weight.dtype
        return torch.cat([p.to(dtype) for p in parts], 1), torch.cat(positions).to(parts[0].device), first

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

    def transform(self, x, memory=None, cache=None, probe=None, positions=None):
        """The transformer blocks on input embeddings ``x`` ``(B, T, n_embd)`` (position
        embeddings added here): hidden states before ``ln_f``. ``positions``: the wpe index of
        each of the ``T`` positions, -1 for none (``prefill_inputs``); by default they continue
        after the cache's (from 0 without one), and the cache grows by ``T``. ``probe``: see
        ``forward``."""
        past = 0 if cache is None else cache.positions
        T = x.size(1)
        if past + T > self.cfg.block_size:
            raise VlcapError(f"a sequence of {past + T} positions exceeds the decoder context of "
                             f"{self.cfg.block_size} (model.decoder.block_size); {FIT_HINT}")
        if probe is not None:
            self.check_probe(probe, cache)
        x = x + self.position_embeddings(positions, T, cache, x.device)
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

    def position_embeddings(self, positions, T, cache, device):
        """``(T, n_embd)``: ``wpe`` at ``positions`` (zero where -1), or at the next ``T``
        positions of the cache (from 0 without one), which then moves on by ``T``."""
        if positions is None:
            first = 0 if cache is None else cache.next_position
            if cache is not None:
                cache.next_position += T
            return self.wpe(torch.arange(first, first + T, device=device))
        return self.wpe(positions.clamp(min=0)) * (positions >= 0).unsqueeze(-1).to(self.wpe.weight.dtype)

    def check_probe(self, probe, cache):
        # A probe reads a full-sequence forward: the cache's path shares image keys/values
        # between beam rows and keeps nothing. Layers are indices as the caller resolved them.
        if cache is not None:
            raise ValueError("an attention probe reads a full-sequence forward, not incremental decoding with a cache")
        bad = [layer for layer in probe.layers if not 0 <= layer < self.cfg.n_layer]
        if bad:
            raise ValueError(f"attention probe layer(s) {bad}: the decoder has layers 0..{self.cfg.n_layer - 1}")
        missing = [layer for layer in probe.layers if probe.kind == "cross" and self.h[layer].cross_attn is None]
        if missing:
            raise ValueError(f"attention probe layer(s) {missing} have no cross-attention")

    def pretrained_parameters(self):
        """The parameters a ``decoder_model.bin`` provides (everything but what connectors add)."""
        params = dict(self.named_parameters())
        return [params[key] for key in course_keys(self.cfg)]
