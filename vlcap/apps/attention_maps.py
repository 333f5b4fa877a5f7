"""``vlcap visualize`` as one call: choose the images, load the checkpoint, draw them
(``vlcap.apps.visualize`` draws)."""
from vlcap.apps import visualize as viz
from vlcap.core.errors import VlcapError, few
from vlcap.core.model.attention import parse_head
from vlcap.core.model.checkpoint import load_checkpoint
from vlcap.core.runtime import resolve_device


def choose_targets(images=(), *, rank_by=None, pred_path=None, annotations_path=None, image_dir=None,
                   clip_model=None, top=1, bottom=1, console=None):
    """The images to draw: ``images`` (files or folders, each checked readable), or with
    ``rank_by="clipscore"`` the ``top`` best and ``bottom`` worst images of ``pred_path`` by
    CLIPScore against ``annotations_path`` (images in ``image_dir``), carrying their captions."""
    if rank_by:
        if images:
            raise VlcapError(f"--rank-by draws images chosen from --pred; drop the IMAGES arguments ({few(images)})")
        if not (pred_path and annotations_path and image_dir):
            raise VlcapError("--rank-by clipscore needs --pred pred.json, --annotations val.json and --images DIR")
        return viz.rank_by_clipscore(pred_path, annotations_path, image_dir, clip_model, top, bottom, console=console)
    if pred_path or annotations_path or image_dir:
        raise VlcapError("--pred, --annotations and --images choose images for --rank-by clipscore; "
                         "pass --rank-by clipscore, or give the images as arguments")
    targets = viz.collect_images(images)
    viz.check_readable(targets)
    return targets


def draw_attention_maps(images, checkpoint, out_dir, registry, *, decoder_weights=None, device="auto", head="mean",
                        rank_by=None, pred_path=None, annotations_path=None, image_dir=None, clip_model=None,
                        top=1, bottom=1, console=None, **drawing):
    """Draw the cross-attention over each image ``choose_targets`` picks (from ``images``, or
    ranked with ``rank_by``; CLIPScore progress on ``console``) into ``out_dir``, with the
    checkpoint loaded on ``device``. ``head`` and ``drawing`` (strategy, options, max_length,
    layer, pieces, save_npz) are ``vlcap.apps.visualize.visualize``'s. Every input is checked
    before the checkpoint loads. Returns one ``Drawn`` per image."""
    parse_head(head)  # the range is checked once the checkpoint says how many heads there are
    device = resolve_device(device)
    targets = choose_targets(images, rank_by=rank_by, pred_path=pred_path, annotations_path=annotations_path,
                             image_dir=image_dir, clip_model=clip_model, top=top, bottom=bottom, console=console)
    loaded = load_checkpoint(checkpoint, registry, decoder_weights=decoder_weights, device=device)
    return viz.visualize(loaded, targets, out_dir, registry, head=head, **drawing)
