"""Looking inside a timm ViT: how its learned position embeddings relate, and where a query
token (the [class] token) attends.

Attention weights are recomputed, not read from the forward: timm's ``Attention`` runs fused
``scaled_dot_product_attention`` (no weights exist) unless told otherwise. A forward pre-hook on
the chosen block's ``attn`` captures its input (the block's normed tokens), and
``softmax(q k^T / sqrt(d))`` is computed from that module's own ``qkv`` (and ``q_norm``/``k_norm``)
layers, exactly as its unfused path does. This works for every model built on timm's
``Attention`` (ViT, DeiT, CLIP/SigLIP/DINOv2 ViTs, ...) and refuses, in one line, blocks whose
attention differs (rotary embeddings, separate q/k/v, windows).
"""
import torch
from timm.layers import Attention as TimmAttention

from vlcap.core.errors import VlcapError

QUERIES = ("cls", "mean")  # the [class] token as query, or the mean over the patch queries


def check_vit(vit, name):
    """``vit`` must be a timm ViT: a patch embedding and a stack of transformer blocks."""
    if not hasattr(vit, "patch_embed") or not hasattr(vit, "blocks"):
        raise VlcapError(f"'{name}' is not a ViT (no patch embedding or transformer blocks); choose a timm ViT, "
                         "e.g. vit_base_patch16_224")
    return vit


def patch_grid_shape(vit):
    """``(rows, cols)`` of the model's patch grid (from its patch embedding)."""
    return tuple(int(n) for n in vit.patch_embed.grid_size)


def patch_position_embeddings(vit):
    """The learned position embedding of every patch position, ``(rows * cols, dim)``: the
    [class]/register positions are left out (timm keeps them first, or not at all with
    ``no_embed_class``)."""
    pos = getattr(vit, "pos_embed", None)
    if not isinstance(pos, torch.Tensor):
        raise VlcapError(f"{type(vit).__name__} has no learned position embedding (pos_embed); "
                         "it encodes positions another way (e.g. rotary), so there is no grid to draw")
    rows, cols = patch_grid_shape(vit)
    patches, prefix = rows * cols, int(getattr(vit, "num_prefix_tokens", 0))
    pos = pos.detach().float().reshape(-1, pos.shape[-1])
    if pos.shape[0] not in (patches, patches + prefix):
        raise VlcapError(f"{type(vit).__name__}: pos_embed holds {pos.shape[0]} positions, not the {patches} "
                         f"patches of its {rows}x{cols} grid (plus {prefix} prefix tokens)")
    return pos[-patches:]


def position_similarity(vit):
    """Cosine similarity between every pair of patch position embeddings, as
    ``(rows, cols, rows, cols)``: ``[i, j]`` is the map of position (i, j) against all others,
    the ViT paper's figure 7 (its own entry is 1)."""
    pos = torch.nn.functional.normalize(patch_position_embeddings(vit), dim=-1)
    rows, cols = patch_grid_shape(vit)
    return (pos @ pos.T).reshape(rows, cols, rows, cols)


def check_layer(vit, layer):
    """``layer`` (negative counts from the last) as an index into ``vit.blocks``."""
    blocks = getattr(vit, "blocks", None)
    if blocks is None:
        raise VlcapError(f"{type(vit).__name__} has no transformer blocks (model.blocks); choose a timm ViT")
    if not -len(blocks) <= layer < len(blocks):
        raise VlcapError(f"--layer {layer}: out of range for a {len(blocks)}-layer ViT "
                         f"(use 0..{len(blocks) - 1}, or -1 for the last)")
    return layer % len(blocks)


def check_attention_module(attn, layer):
    """The block's attention must be timm's own multi-head ``Attention`` (fused ``qkv``), with
    its forward as timm wrote it: anything else (rotary, windows, a subclass) would make the
    recomputed weights differ from the ones the model uses."""
    if not isinstance(attn, TimmAttention) or type(attn).forward is not TimmAttention.forward:
        raise VlcapError(f"block {layer}'s attention ({type(attn).__module__}.{type(attn).__qualname__}) is not "
                         "timm's multi-head Attention with a fused qkv layer; its weights cannot be recomputed")


@torch.no_grad()
def attention_weights(vit, pixels, layer=-1):
    """Self-attention probabilities of block ``layer`` for ``pixels`` ``(B, 3, H, W)``:
    ``(B, heads, tokens, tokens)``, rows are queries and sum to 1 (prefix tokens first)."""
    index = check_layer(vit, layer)
    attn = vit.blocks[index].attn
    check_attention_module(attn, index)
    captured = []

    def capture(module, args, kwargs):  # the block's normed tokens, however the block passes them
        captured.append(args[0] if args else kwargs["x"])

    handle = attn.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        vit.forward_features(pixels)
    finally:
        handle.remove()
    x = captured[0].float()
    batch, tokens, _ = x.shape
    qkv = torch.nn.functional.linear(x, attn.qkv.weight.float(),
                                     None if attn.qkv.bias is None else attn.qkv.bias.float())
    q, k, _ = qkv.reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(q), attn.k_norm(k)
    return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)


def query_attention(vit, weights, query="cls"):
    """Each head's attention from one query over the patches, ``(B, heads, rows, cols)``:
    ``"cls"``, the [class] token's row; ``"mean"``, the mean of the patch queries' rows (for
    models without a class token). Prefix (class/register) keys are left out."""
    if query not in QUERIES:
        raise ValueError(f"query must be one of {QUERIES}, got {query!r}")
    prefix = int(getattr(vit, "num_prefix_tokens", 0))
    rows, cols = patch_grid_shape(vit)
    if query == "cls":
        if getattr(vit, "cls_token", None) is None:
            raise VlcapError(f"{type(vit).__name__} has no [class] token; pass --query mean to draw the mean "
                             "attention of the patch queries instead")
        row = weights[:, :, 0, prefix:]
    else:
        row = weights[:, :, prefix:, prefix:].mean(dim=2)
    return row.reshape(*row.shape[:2], rows, cols)
