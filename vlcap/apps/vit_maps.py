"""`vlcap vit-maps`: what a timm ViT learned about positions, and where its [class] token looks.

``pos-embed.png`` is the ViT paper's figure 7: for every patch position (i, j), a small map of the
cosine similarity between its learned position embedding and every other patch's, laid out on
the patch grid ([class]/register positions left out). ``STEM_cls-attention.png`` shows, for each
image as the ViT sees it (resized and cropped by its own transform), the attention of the
[class] token (as query) to every patch (as keys) in one layer: the mean over heads, then one
panel per head, each upsampled to the image and stretched to its own range as in
``vlcap visualize``. Models without a class token draw the mean over the patch queries instead
(``query="mean"``). The weights are recomputed by ``vlcap.core.model.vit_inspect``.
"""
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from vlcap.apps.visualize import collect_images, draw_panels, save_attention_npz
from vlcap.core import config as config_lib
from vlcap.core.atomic import atomic_write
from vlcap.core.config import RunConfig
from vlcap.core.data import load_image
from vlcap.core.errors import VlcapError
from vlcap.core.model import vit_inspect
from vlcap.core.model.captioner import build_encoder
from vlcap.core.model.checkpoint import FORMAT as CAPTIONER_FORMAT
from vlcap.core.model.checkpoint import read_metadata
from vlcap.core.model.classifier import FORMAT as CLASSIFIER_FORMAT
from vlcap.core.model.classifier import checkpoint_format, load_classifier
from vlcap.core.model.encoder import create_vit, unnormalize, vit_transform
from vlcap.core.model.peft import seeded
from vlcap.core.runtime import resolve_device

HEAD_PANELS_PER_ROW = 6
QUERY_TITLES = {"cls": "[class] token", "mean": "mean of the patch queries"}


@dataclass
class VitMaps:
    model: str  # what was drawn: the encoder name, and the checkpoint it came from
    pos_embed_png: Optional[Path]  # None for a model without a learned position embedding
    attention_pngs: list
    npz: list
    note: str = ""  # one line about what could not be drawn


def load_vit(encoder=None, checkpoint=None, pretrained=True):
    """``(timm ViT, description)``: ``encoder`` by timm name, or the ViT of a checkpoint: a
    classifier's fine-tuned ViT, or the frozen encoder a captioner checkpoint records (built as
    training built it: its pretrained weights, or the same seeded random ones)."""
    if (encoder is None) == (checkpoint is None):
        raise VlcapError("pass either --encoder NAME (a timm ViT) or --checkpoint CKPT, not both or neither")
    if encoder is not None:
        return create_vit(encoder, pretrained, offline_hint="pass --no-pretrained to draw a random model"), encoder
    kind = checkpoint_format(checkpoint)
    if kind == CLASSIFIER_FORMAT:
        loaded = load_classifier(checkpoint)
        return loaded.model.vit, f"{loaded.config.model.encoder} fine-tuned ({checkpoint})"
    if kind != CAPTIONER_FORMAT:
        raise VlcapError(f"{checkpoint}: not a vlcap checkpoint (format {kind!r}); pass one written by "
                         "vlcap train or vlcap train-classifier")
    cfg = config_lib.from_dict(RunConfig, read_metadata(checkpoint)["config"], where=f"{checkpoint} metadata")
    with seeded(cfg.model.init_seed):  # the encoder training built, first thing under this seed
        return build_encoder(cfg).vit, f"{cfg.model.encoder} ({checkpoint})"


def draw_position_similarity(similarity, title, path):
    """The ``(rows, cols, rows, cols)`` similarities as one tiled image (a map per position, a
    blank line between maps) with a colour bar, saved atomically as a PNG."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    rows, cols = similarity.shape[:2]
    canvas = np.full((rows * (rows + 1) - 1, cols * (cols + 1) - 1), np.nan)
    for i in range(rows):
        for j in range(cols):
            canvas[i * (rows + 1):i * (rows + 1) + rows, j * (cols + 1):j * (cols + 1) + cols] = similarity[i, j]
    cmap = colormaps["viridis"].with_extremes(bad="white")
    figure = Figure(figsize=(7.5, 6.8), layout="constrained")
    ax = figure.subplots()
    shown = ax.imshow(canvas, cmap=cmap, vmin=-1, vmax=1, interpolation="nearest")
    ax.set_xticks([j * (cols + 1) + (cols - 1) / 2 for j in range(cols)], range(1, cols + 1), fontsize=7)
    ax.set_yticks([i * (rows + 1) + (rows - 1) / 2 for i in range(rows)], range(1, rows + 1), fontsize=7)
    ax.set_xlabel("input patch column")
    ax.set_ylabel("input patch row")
    figure.colorbar(shown, ax=ax, label="cosine similarity", shrink=0.8)
    figure.suptitle(title, fontsize=10)
    with atomic_write(path, "wb") as f:
        figure.savefig(f, format="png", dpi=110)


def draw_query_attention(image, maps, title, path):
    """``image`` (H, W, 3), then the mean of ``maps`` ``(heads, rows, cols)`` and each head's map
    blended over it, saved atomically as a PNG. Returns the panels drawn."""
    panels = [("image", None), ("mean of heads", maps.mean(dim=0))]
    panels += [(f"head {h}", maps[h]) for h in range(len(maps))]
    return draw_panels(image, panels, title, path, per_row=HEAD_PANELS_PER_ROW)


def position_maps(vit, name, out_dir, save_npz):
    """pos-embed.png (and .npz); ``(png or None, npz or None, note)``."""
    try:
        similarity = vit_inspect.position_similarity(vit)
    except VlcapError as exc:  # e.g. rotary positions: nothing to draw, the attention maps still are
        return None, None, str(exc)
    rows, cols = similarity.shape[:2]
    png = out_dir / "pos-embed.png"
    draw_position_similarity(similarity.numpy(), f"{name}: position embedding similarity ({rows}x{cols} patches)", png)
    npz = None
    if save_npz:
        npz = out_dir / "pos-embed.npz"
        save_attention_npz(npz, similarity=similarity.numpy(), grid_size=np.array([rows, cols]))
    return png, npz, ""


def attention_maps(vit, name, targets, out_dir, layer, query, save_npz, device):
    """STEM_cls-attention.png (and .npz) per target; ``(pngs, npzs)``."""
    transform, index = vit_transform(vit), vit_inspect.check_layer(vit, layer)
    pngs, npzs = [], []
    for target in targets:
        pixels = transform(load_image(target.path)).to(device)
        weights = vit_inspect.attention_weights(vit, pixels[None], index)
        maps = vit_inspect.query_attention(vit, weights, query)[0].cpu()
        title = f"{target.path.name}: {name}\nattention of the {QUERY_TITLES[query]}, layer {index}"
        png = out_dir / f"{target.name}_cls-attention.png"
        draw_query_attention(unnormalize(vit, pixels), maps, title, png)
        pngs.append(png)
        if save_npz:
            npzs.append(out_dir / f"{target.name}_cls-attention.npz")
            save_attention_npz(npzs[-1], head_maps=maps.numpy(), mean_map=maps.mean(dim=0).numpy(),
                               weights=weights[0].cpu().numpy(), layer=np.array(index), query=np.array(query),
                               num_prefix_tokens=np.array(int(getattr(vit, "num_prefix_tokens", 0))),
                               grid_size=np.array(vit_inspect.patch_grid_shape(vit)))
    return pngs, npzs


def draw_vit_maps(images, out_dir, *, encoder=None, checkpoint=None, pretrained=True, layer=-1, query="cls",
                  save_npz=False, device="cpu"):
    """``vlcap vit-maps``: pos-embed.png and, per image, STEM_cls-attention.png in ``out_dir``.
    Every image is checked readable, the layer in range and the query possible before anything
    is written."""
    if query not in vit_inspect.QUERIES:
        raise VlcapError(f"--query {query!r}: choose one of {', '.join(vit_inspect.QUERIES)}")
    targets = collect_images(images) if images else []
    for target in targets:
        load_image(target.path)
    device = resolve_device(device)
    vit, name = load_vit(encoder, checkpoint, pretrained)
    vit_inspect.check_vit(vit, name)
    vit.to(device).eval()
    vit_inspect.check_layer(vit, layer)
    if targets and query == "cls" and getattr(vit, "cls_token", None) is None:
        raise VlcapError(f"{name} has no [class] token; pass --query mean to draw the mean attention of the "
                         "patch queries instead")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    png, npz, note = position_maps(vit, name, out_dir, save_npz)
    with torch.no_grad():
        pngs, npzs = attention_maps(vit, name, targets, out_dir, layer, query, save_npz, device)
    return VitMaps(name, png, pngs, [p for p in [npz, *npzs] if p is not None], note)
