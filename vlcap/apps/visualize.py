"""`vlcap visualize`: per-word attention heat maps over the image, one PNG per image.

Each figure shows the image as the encoder sees it (its timm transform resizes and crops, and
the patch grid covers exactly that), titled ``<start>``, then one panel per produced word: that
word's attention (``vlcap.core.model.attention``: the cross-attention, or with image tokens in the
decoder's input the self-attention to them) over the patch grid (pooled, if the connector pools
it), bilinearly upsampled to the image, stretched to its own min..max and blended over the image. ``--rank-by clipscore`` picks the
best and worst scored images of a prediction file and draws the caption that was scored.
"""
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch.nn.functional as F

from vlcap.core.atomic import atomic_write
from vlcap.core.model.checkpoint import load_checkpoint
from vlcap.core.model.attention import (check_layer, group_words, parse_head, patch_grid, probed_attention,
                                        token_attention, word_attention)
from vlcap.core.eval.clip import load_clip
from vlcap.core.data import find_images, load_captions, load_image
from vlcap.core.infer.decoding import generate_tokens
from vlcap.core.errors import VlcapError, few
from vlcap.core.eval.evaluation import (check_images, check_predictions, clip_scores, image_paths_for,
                                   load_predictions)
from vlcap.core.infer.captioning import resolve_decoding
from vlcap.core.runtime import autocast, inference_dtype, resolve_device

PANELS_PER_ROW = 5
COLORMAP = "jet"


@dataclass
class Target:
    """An image to draw; ``caption`` (teacher-forced) instead of decoding when given."""
    path: Path
    name: str  # output file stem
    caption: Optional[str] = None
    note: str = ""  # added to the figure title, e.g. the CLIPScore


@dataclass
class Drawn:
    name: str
    png: Path
    npz: Optional[Path]
    caption: str
    words: list  # panel titles after <start>
    panels: int  # panels drawn, <start> included
    note: str = ""


def collect_images(paths):
    """``IMAGES...`` arguments (files, or folders of images) as targets named by file stem."""
    if not paths:
        raise VlcapError("no images: pass image files or folders, or --rank-by clipscore with --pred")
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            files += find_images(path)
        elif path.is_file():
            files.append(path)
        else:
            raise VlcapError(f"{path}: image not found")
    stems = [p.stem for p in files]
    shared = sorted({s for s in stems if stems.count(s) > 1})
    if shared:
        raise VlcapError(f"several images share the file stem(s) {few(shared)}; the PNGs are named by stem, "
                         "so rename them or pass them separately")
    return [Target(p, p.stem) for p in files]


def check_readable(targets):
    """Every image opens, checked before any model loads or any figure is written."""
    for target in targets:
        load_image(target.path)


def rank_by_clipscore(pred_path, annotations_path, image_dir, clip_model=None, top=1, bottom=1, console=None,
                      device=None, precision="auto"):
    """The ``top`` best and ``bottom`` worst images of a prediction file by CLIPScore (the
    evaluation code's checks and scores, CLIP on ``device`` in ``precision``), as targets
    carrying their scored caption."""
    if top < 0 or bottom < 0 or top + bottom == 0:
        raise VlcapError(f"--top/--bottom: ask for at least one image (got --top {top} --bottom {bottom})")
    predictions = load_predictions(pred_path)
    caption_set = load_captions(annotations_path)
    check_predictions(predictions, caption_set.references(), where=f"{pred_path} (against {annotations_path})")
    image_paths = image_paths_for(caption_set, image_dir)
    check_images(predictions, image_paths, where=f"{annotations_path} (images in {image_dir})")
    clip = load_clip(clip_model, device=device, precision=precision)
    scores = clip_scores(predictions, image_paths, clip, console=console).per_image
    ranked = sorted(scores, key=lambda stem: -scores[stem])  # stable: ties keep the file's order
    chosen = [("best", i, s) for i, s in enumerate(ranked[:top], 1)]
    chosen += [("worst", i, s) for i, s in enumerate(ranked[::-1][:min(bottom, len(ranked))], 1)]
    return [Target(Path(image_paths[stem]), f"{kind}-{rank}_{stem}", predictions[stem],
                   f"{kind} {rank} by CLIPScore: {scores[stem]:.4f}") for kind, rank, stem in chosen]


def heat_map(grid, size):
    """A ``(rows, cols)`` patch map bilinearly upsampled to ``size`` (H, W), scaled to [0, 1]."""
    up = F.interpolate(grid[None, None].float(), size=size, mode="bilinear", align_corners=False)[0, 0]
    up = up - up.min()
    return (up / up.max() if up.max() > 0 else up).numpy()


def draw_attention(image, titles, grids, title, path, per_row=PANELS_PER_ROW):
    """Save the figure as a PNG (atomically): ``image`` (H, W, 3) titled ``<start>``, then one
    panel per ``grids[i]`` blended over it and titled ``titles[i]``. Returns the panels drawn."""
    return draw_panels(image, [("<start>", None), *zip(titles, grids)], title, path, per_row)


def draw_panels(image, panels, title, path, per_row=PANELS_PER_ROW):
    """Save ``per_row`` panels a row as a PNG (atomically): per ``(name, grid)`` of ``panels``,
    ``image`` (H, W, 3) with the patch map ``grid`` blended over it (None: the image alone),
    titled ``name``. Returns the panels drawn."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend

    cols = min(per_row, len(panels))
    rows = math.ceil(len(panels) / cols)
    figure = Figure(figsize=(2.2 * cols, 2.3 * rows + 0.6), layout="constrained")
    axes = figure.subplots(rows, cols, squeeze=False).ravel()
    for ax, (name, grid) in zip(axes, panels):
        ax.imshow(image)
        if grid is not None:
            ax.imshow(heat_map(grid, image.shape[:2]), cmap=COLORMAP, alpha=0.5, vmin=0, vmax=1)
        ax.set_title(name, fontsize=10)
    for ax in axes:
        ax.axis("off")
    figure.suptitle(title, fontsize=11, wrap=True)
    with atomic_write(path, "wb") as f:
        figure.savefig(f, format="png", dpi=100)
    return len(panels)


def save_attention_npz(path, **arrays):
    with atomic_write(path, "wb") as f:
        np.savez_compressed(f, **arrays)


def save_word_maps_npz(path, *, caption, tokens, token_texts, weights, words, per_word, grids, image_tokens, layer,
                       head, **extra):
    """``--save-npz``: one image's arrays, the same keys for every model (vlcap's captioners and
    ``--hf-model``): the caption, its tokens and their weights over the image tokens (and on the
    grid), the words, each word's weights and map, the grid, layer and head; ``extra`` adds keys."""
    save_attention_npz(
        path, caption=np.array(caption), token_ids=np.array(tokens, dtype=np.int64),
        tokens=np.array(token_texts, dtype=str), token_weights=weights.numpy(),
        token_maps=patch_grid(weights, image_tokens).numpy(), words=np.array([w.text for w in words], dtype=str),
        word_of_token=np.array([i for i, w in enumerate(words) for _ in w.pieces], dtype=np.int64),
        word_weights=per_word.numpy(), word_maps=grids.numpy(), grid_size=np.array(image_tokens.grid),
        num_prefix_tokens=np.array(image_tokens.prefix), layer=np.array(layer),
        head=np.array("mean" if head is None else str(head)), **extra)


def visualize(loaded, targets, out_dir, registry, *, strategy=None, options=None, max_length=None, layer=-1,
              head="mean", pieces=False, save_npz=False, precision="auto"):
    """Draw the attention to the image of decoder layer ``layer`` (head ``head``: an index or "mean")
    for each target: the caption decoding produces (``strategy``/``options`` over the
    checkpoint's), or the target's own caption, teacher-forced; computed in ``precision``
    (``runtime.inference_dtype``). Returns one ``Drawn`` per target."""
    cfg = loaded.config
    layer = check_layer(layer, cfg.model.decoder.n_layer)
    probed_attention(loaded.captioner, layer)  # a layer that does not see the image: one line, before decoding
    head_index = parse_head(head, cfg.model.decoder.n_head)
    decoding = resolve_decoding(cfg.decoding, registry, strategy, options, max_length)
    dtype = inference_dtype(precision, next(loaded.captioner.parameters()).device)
    return [draw_target(loaded, target, Path(out_dir), decoding, layer, head_index, pieces, save_npz, dtype)
            for target in targets]


def target_attention(loaded, target, decoding, layer, head_index, dtype=None):
    """``(pixels, tokens, weights, image_share)``: the target's preprocessed image, its caption's
    tokens (decoded, or its own caption), each token's attention over the image tokens and the
    share of it that went to the image (``token_attention``)."""
    captioner, tokenizer = loaded.captioner, loaded.tokenizer
    device = next(captioner.parameters()).device
    pixels = captioner.encoder.transform()(load_image(target.path)).to(device)
    with autocast(device, dtype):
        if target.caption is None:
            tokens = generate_tokens(captioner, pixels[None], tokenizer, *decoding)[0]
        else:
            tokens = tokenizer.encode(target.caption)
        weights, share = token_attention(captioner, pixels, tokens, tokenizer.eot_id, layer, head_index)
    return pixels, tokens, weights, share


def draw_target(loaded, target, out_dir, decoding, layer, head_index, pieces, save_npz, dtype=None):
    """The PNG (and with ``save_npz`` the arrays) of one target, computed under autocast ``dtype``."""
    tokenizer, encoder, image_tokens = loaded.tokenizer, loaded.captioner.encoder, loaded.captioner.image_tokens
    pixels, tokens, weights, share = target_attention(loaded, target, decoding, layer, head_index, dtype)
    caption = tokenizer.decode(tokens).strip() if target.caption is None else target.caption
    words = group_words(tokenizer, tokens, pieces)
    per_word = word_attention(weights, words)
    grids = patch_grid(per_word, image_tokens)
    heads = "mean of heads" if head_index is None else f"head {head_index}"
    kind = ("cross-attention" if probed_attention(loaded.captioner, layer) == "cross"
            else "self-attention to the image tokens")
    title = f"\u201c{caption}\u201d\n{target.note + ' | ' if target.note else ''}{kind}, layer {layer}, {heads}"
    png = out_dir / f"{target.name}.png"
    panels = draw_attention(encoder.unnormalize(pixels), [w.text for w in words], grids, title, png)
    npz = None
    if save_npz:
        npz = out_dir / f"{target.name}.npz"
        token_texts = [w.text for w in group_words(tokenizer, tokens, pieces=True)]
        save_word_maps_npz(npz, caption=caption, tokens=tokens, token_texts=token_texts, weights=weights, words=words,
                           per_word=per_word, grids=grids, image_tokens=image_tokens, layer=layer, head=head_index,
                           **({} if share is None else {"image_share": share.numpy()}))
    return Drawn(target.name, png, npz, caption, [w.text for w in words], panels, target.note)


def choose_targets(images=(), *, rank_by=None, pred_path=None, annotations_path=None, image_dir=None,
                   clip_model=None, top=1, bottom=1, console=None, device=None, precision="auto"):
    """The images to draw: ``images`` (files or folders, each checked readable), or with
    ``rank_by="clipscore"`` the ``top`` best and ``bottom`` worst images of ``pred_path`` by
    CLIPScore against ``annotations_path`` (images in ``image_dir``; CLIP on ``device`` in
    ``precision``), carrying their captions."""
    if rank_by:
        if images:
            raise VlcapError(f"--rank-by draws images chosen from --pred; drop the IMAGES arguments ({few(images)})")
        if not (pred_path and annotations_path and image_dir):
            raise VlcapError("--rank-by clipscore needs --pred pred.json, --annotations val.json and --images DIR")
        return rank_by_clipscore(pred_path, annotations_path, image_dir, clip_model, top, bottom, console=console,
                                 device=device, precision=precision)
    if pred_path or annotations_path or image_dir:
        raise VlcapError("--pred, --annotations and --images choose images for --rank-by clipscore; "
                         "pass --rank-by clipscore, or give the images as arguments")
    targets = collect_images(images)
    check_readable(targets)
    return targets


def draw_attention_maps(images, checkpoint, out_dir, registry, *, decoder_weights=None, device="auto", head="mean",
                        rank_by=None, pred_path=None, annotations_path=None, image_dir=None, clip_model=None,
                        top=1, bottom=1, console=None, precision="auto", **drawing):
    """Draw the attention to the image over each image ``choose_targets`` picks (from ``images``, or
    ranked with ``rank_by``; CLIPScore progress on ``console``) into ``out_dir``, with the
    checkpoint loaded on ``device``, computing in ``precision`` (the CLIP ranking too). ``head``
    and ``drawing`` (strategy, options, max_length, layer, pieces, save_npz) are ``visualize``'s.
    Every input is checked
    before the checkpoint loads. Returns one ``Drawn`` per image."""
    parse_head(head)  # the range is checked once the checkpoint says how many heads there are
    device = resolve_device(device)
    targets = choose_targets(images, rank_by=rank_by, pred_path=pred_path, annotations_path=annotations_path,
                             image_dir=image_dir, clip_model=clip_model, top=top, bottom=bottom, console=console,
                             device=device, precision=precision)
    loaded = load_checkpoint(checkpoint, registry, decoder_weights=decoder_weights, device=device)
    return visualize(loaded, targets, out_dir, registry, head=head, precision=precision, **drawing)
