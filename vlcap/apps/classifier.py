"""`vlcap train-classifier` and `vlcap classify --classifier`: a timm ViT fine-tuned as an image
classifier (``vlcap.core.train.classifier``), and its predictions as the course's
``filename,label`` CSV, like the zero-shot classifier's (``vlcap.apps.classify``)."""
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from vlcap.core import config as config_lib
from vlcap.core.config import ClassifierConfig
from vlcap.core.data import find_images, iterate_images
from vlcap.core.errors import VlcapError, few
from vlcap.core.model.classifier import load_classifier
from vlcap.core.outputs import write_csv
from vlcap.core.progress import progress_bar
from vlcap.core.runtime import autocast, autocast_dtype, resolve_device
from vlcap.core.train.classifier import (CLASS_IN_NAME, classifier_resume_config, read_labels_csv,
                                         train_classifier)

# The zero-shot options `classify --classifier` has no use for (CLI parameter name -> flag).
ZERO_SHOT_ONLY = {"labels_file": "--labels", "templates": "--template", "clip_model": "--clip-model",
                  "plot_top5": "--plot-top5", "out_dir": "--out-dir"}


def classifier_config(config_file=None, overrides=()):
    """Defaults <- YAML file <- each override dict (as ``config.resolve`` does for captioning)."""
    data = config_lib.to_dict(ClassifierConfig())
    if config_file:
        data = config_lib.merge(data, config_lib.load_yaml(config_file))
    for override in overrides:
        data = config_lib.merge(data, override)
    return config_lib.from_dict(ClassifierConfig, data)


def train(cfg, out, console=None, overwrite=False):
    if not out:
        raise VlcapError("no run directory: pass --out RUN")
    return train_classifier(cfg, out, console=console, overwrite=overwrite)


def resume(run_dir, train_overrides=None, console=None):
    """Continue the run in ``run_dir`` (``--epochs``/``--max-steps``: a new, longer length;
    ``--lr``: a new peak learning rate, e.g. after a NaN stop)."""
    overrides = dict(train_overrides or {})
    new_length = any(key in overrides for key in config_lib.LENGTH_KEYS)
    return train_classifier(classifier_resume_config(run_dir, overrides), run_dir, console=console, resume=True,
                            new_length=new_length)


@dataclass
class Predictions:
    files: list  # file names of the images classified, sorted
    labels: list  # predicted class of each
    bad: list  # messages of the unreadable images
    accuracy: Optional[tuple] = None  # (correct, total) with a report


def check_zero_shot_options(given):
    """``given``: parameter name -> value of the zero-shot-only options (None / empty: not given)."""
    used = [flag for name, flag in ZERO_SHOT_ONLY.items() if given.get(name)]
    if used:
        raise VlcapError(f"--classifier classifies with a fine-tuned ViT; {', '.join(used)} belong to zero-shot "
                         "CLIP classification: drop them")


def true_classes(files, ground_truth=None):
    """file name -> true class from a ``filename,label`` CSV or the ``{class}_{n}`` names."""
    if ground_truth:
        labels = read_labels_csv(ground_truth)
        missing = [f for f in files if f not in labels]
        if missing:
            raise VlcapError(f"{ground_truth}: no label for {len(missing)} image(s): {few(missing)}")
        return {f: labels[f] for f in files}
    unnamed = [f for f in files if not CLASS_IN_NAME.match(Path(f).stem)]
    if unnamed:
        raise VlcapError(f"cannot read the true class of {few(unnamed)} from the name (expected {{class}}_{{n}}.ext); "
                         "pass --ground-truth filename,label.csv")
    return {f: CLASS_IN_NAME.match(Path(f).stem).group(1) for f in files}


@torch.no_grad()
def predict(model, paths, batch_size, device, dtype, console=None):
    """``(file names, predicted classes, unreadable messages)`` for ``paths``, in input order."""
    files, labels, bad = [], [], []
    with progress_bar("classifying", console, transient=True) as progress:
        task = progress.add_task("images", total=len(paths))
        for pixels, indices, unreadable in iterate_images(paths, model.transform(), batch_size, device):
            bad += [item.message for item in unreadable]
            if pixels is not None:
                with autocast(device, dtype):
                    best = model(pixels).argmax(dim=-1).tolist()
                files += [paths[i].name for i in indices]
                labels += [model.classes[i] for i in best]
            progress.advance(task, len(indices) + len(unreadable))
    return files, labels, bad


def classify_with_classifier(images_dir, checkpoint, *, out=None, report=False, ground_truth=None, batch_size=128,
                             device="cpu", skip_bad_images=False, console=None):
    """``vlcap classify IMAGES --classifier CKPT``: predict every image's class with the fine-tuned
    ViT, write ``out`` as ``filename,label`` rows sorted by file name, and with ``report`` count
    the correct ones. Unreadable images fail the run unless ``skip_bad_images``."""
    if not (out or report):
        raise VlcapError("nothing to do: pass --out pred.csv and/or --report")
    if batch_size < 1:
        raise VlcapError(f"--batch-size must be >= 1, got {batch_size}")
    paths = find_images(images_dir)
    truth = true_classes([p.name for p in paths], ground_truth) if report else None
    device = resolve_device(device)
    loaded = load_classifier(checkpoint, device=device)
    dtype = autocast_dtype(loaded.config.train.amp, device)
    files, labels, bad = predict(loaded.model, paths, batch_size, device, dtype, console)
    if bad and not skip_bad_images:
        raise VlcapError(f"{len(bad)} unreadable image(s) in {images_dir}: {few(bad)}; fix or remove them, or pass "
                         "--skip-bad-images to classify the rest")
    if not files:
        raise VlcapError(f"{images_dir}: none of the images could be read")
    if out:
        write_csv(out, ["filename", "label"], sorted(zip(files, labels)))
    accuracy = None
    if truth is not None:
        accuracy = (sum(truth[f] == label for f, label in zip(files, labels)), len(files))
    order = sorted(range(len(files)), key=files.__getitem__)
    return Predictions([files[i] for i in order], [labels[i] for i in order], bad, accuracy)
