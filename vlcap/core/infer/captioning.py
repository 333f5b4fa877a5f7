"""Caption images with a trained checkpoint (what `vlcap caption`, hw3_2.sh and the demo run)."""
from dataclasses import dataclass

from vlcap.core.model.captioner import check_context
from vlcap.core.model.checkpoint import load_checkpoint
from vlcap.core.config import plugin_config
from vlcap.core.validation import Positive, check
from vlcap.core.data import find_images, iterate_images, text_name
from vlcap.core.infer.decoding import caption_images
from vlcap.core.console import say
from vlcap.core.errors import VlcapError
from vlcap.core.outputs import write_predictions
from vlcap.core.progress import progress_bar
from vlcap.core.runtime import autocast, inference_dtype, resolve_device


@dataclass
class Captions:
    predictions: dict  # file stem -> caption
    bad_images: list  # one message per file that could not be read


def decoding_choice(decoding_cfg, strategy, options):
    """(strategy name, options): the checkpoint's decoding config, overridden by the caller's.
    The checkpoint's options only carry over when the strategy is the same."""
    name = strategy or decoding_cfg.strategy
    base = decoding_cfg.options if name == decoding_cfg.strategy else {}
    return name, {**base, **(options or {})}


def resolve_decoding(decoding_cfg, registry, strategy=None, options=None, max_length=None):
    """``(strategy plugin, options, max_length)`` for a checkpoint's ``decoding`` config and the
    caller's overrides; a bad option fails here, before any work."""
    name, options = decoding_choice(decoding_cfg, strategy, options)
    decoding = registry.get("decoding", name)
    plugin_config(decoding, options, "decoding.options")
    if max_length is not None:
        check(Positive, max_length, "--max-length")
    return decoding, options, max_length or decoding_cfg.max_length


def caption_paths(loaded, paths, registry, *, strategy=None, options=None, max_length=None, batch_size=32,
                  precision="auto", console=None):
    """Caption the image files ``paths`` with a ``LoadedCaptioner``, computing in ``precision``
    (``runtime.inference_dtype``; never the checkpoint's training AMP). Unreadable images get a
    warning line each and are left out (returned in ``bad_images``)."""
    if batch_size < 1:
        raise VlcapError(f"--batch-size: must be >= 1, got {batch_size}")
    device = next(loaded.captioner.parameters()).device
    dtype = inference_dtype(precision, device)
    decoding, options, max_length = resolve_decoding(loaded.config.decoding, registry, strategy, options, max_length)
    check_context(loaded.captioner, "--max-length", max_length)
    predictions, bad = {}, []
    with progress_bar("captioning", console) as progress:
        task = progress.add_task("captioning", total=len(paths))
        for pixels, indices, unreadable in iterate_images(paths, loaded.captioner.encoder.transform(), batch_size,
                                                          device):
            for item in unreadable:
                say(progress.console, f"warning: {item.message}; skipped")
                bad.append(item.message)
            if pixels is not None:
                with autocast(device, dtype):
                    captions = caption_images(loaded.captioner, pixels, loaded.tokenizer,
                                              decoding, options, max_length)
                predictions.update(zip((text_name(paths[i].stem) for i in indices), captions))
            progress.advance(task, len(indices) + len(unreadable))
    return Captions(predictions, bad)


def caption_folder(images_dir, checkpoint, out, registry, *, decoder_weights=None, device="auto", merge=False,
                   **decoding):
    """Caption every image in ``images_dir`` and write ``{stem: caption}`` to ``out`` atomically
    (``decoding``: the keyword options of ``caption_paths``). ``merge``: fold the PEFT method into
    the frozen weights first (same captions, faster steps; one line if the method cannot)."""
    paths = find_images(images_dir, unique_stems=True)
    loaded = load_checkpoint(checkpoint, registry, decoder_weights=decoder_weights, device=resolve_device(device),
                             merge=merge)
    result = caption_paths(loaded, paths, registry, **decoding)
    write_predictions(out, result.predictions)
    return result
