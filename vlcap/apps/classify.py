"""Zero-shot image classification with CLIP: compare each image with one text prompt per class.

A prompt template such as ``"a photo of a {object}."`` turns every class name into a sentence;
CLIP's text tower embeds the sentences and its image tower the images, and the class whose
sentence lies closest (cosine) to the image wins. Several templates are ensembled as in the CLIP
paper: each class's unit text embeddings are averaged over the templates and the mean is
renormalised. Images are embedded once, so comparing templates (``report``) only costs one text
pass per template. ``run_classification`` is ``vlcap classify``: it checks every input before
CLIP loads, then predicts, writes, reports and plots.
"""
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from vlcap.core.atomic import atomic_write
from vlcap.core.data import find_images, iterate_images, load_image, read_filename_label_csv, read_json
from vlcap.core.eval import clip as clip_lib
from vlcap.core.console import say
from vlcap.core.errors import VlcapError, few
from vlcap.core.outputs import write_csv
from vlcap.core.progress import progress_bar

PLACEHOLDER = "{object}"
# CLIP's own prompt ensemble for CIFAR-10/100 (openai/CLIP data/prompts.md). The course's set is 50
# CIFAR-100 classes at 32x32, so these (blurry, low-contrast, small, ...) describe its images better
# than the 80 ImageNet templates, and 18 texts per class keep the text pass negligible.
DEFAULT_TEMPLATES = tuple(f"a {quality}photo of {article} {size}{PLACEHOLDER}."
                          for article in ("a", "the")
                          for quality, size in [("", ""), ("blurry ", ""), ("black and white ", ""),
                                                ("low contrast ", ""), ("high contrast ", ""), ("bad ", ""),
                                                ("good ", ""), ("", "small "), ("", "big ")])
GROUND_TRUTH_NAME = re.compile(r"^(\d+)_")  # the course names images {class_id}_{n}.png


@dataclass
class Labels:
    ids: list  # class ids, ascending; column i of every probability matrix is class ids[i]
    names: list


def load_labels(path):
    """``id2label.json``: ``{"0": "bicycle", "1": "chair", ...}``."""
    path = Path(path)
    data = read_json(path, "label file", '{"0": "bicycle", ...}',
                     hint="; pass the course's id2label.json with --labels")
    if not isinstance(data, dict) or not data:
        raise VlcapError(f"{path}: expected a non-empty JSON object mapping class ids to names, e.g. {{\"0\": \"bicycle\"}}")
    labels = {}
    for key, name in data.items():
        if not re.fullmatch(r"\s*\d+\s*", key):
            raise VlcapError(f"{path}: key {key!r} is not a class id; keys must be integers such as \"0\"")
        if not isinstance(name, str) or not name.strip():
            raise VlcapError(f"{path}: class {key} has name {name!r}; every class needs a non-empty name")
        if int(key) in labels:
            raise VlcapError(f"{path}: class id {int(key)} appears twice")
        labels[int(key)] = name.strip()
    ids = sorted(labels)
    return Labels(ids, [labels[i] for i in ids])


def check_template(template):
    if PLACEHOLDER not in template or re.search(r"[{}]", template.replace(PLACEHOLDER, "")):
        raise VlcapError(f"template {template!r} must contain {PLACEHOLDER} (and no other {{...}}), "
                         f"e.g. \"a photo of a {PLACEHOLDER}.\"")
    return template


def prompt_name(name):
    """A class name as CLIP's own prompts write it: underscores as spaces and each run of
    whitespace as one space (``"aquarium_fish"`` -> ``"aquarium fish"``), since CLIP learnt from
    sentences, not identifiers. Only the prompt text changes: outputs keep the raw name."""
    return " ".join(name.replace("_", " ").split())


def text_embeddings(clip, names, template):
    """Unit text embedding of every class name (written as ``prompt_name``) in one template:
    ``(classes, dim)``."""
    return clip.encode_texts([template.replace(PLACEHOLDER, prompt_name(name)) for name in names])


def ensemble(per_template):
    """The CLIP paper's prompt ensemble: mean of the unit embeddings, renormalised. (open_clip's
    ``build_zero_shot_classifier`` computes the same in one pass, but without the per-template
    embeddings that the template report reuses.)"""
    return F.normalize(torch.stack(list(per_template)).mean(dim=0), dim=-1)


@dataclass
class ImageSet:
    files: list  # file names (with extension) of the images that were read, in input order
    embeddings: torch.Tensor  # (len(files), dim), unit length
    bad: list  # (file name, message) for the files that could not be read


def encode_images(clip, paths, batch_size=128, console=None):
    """Embed every image once, batched, with a progress bar; unreadable files are warned about
    (one line each) and collected in ``ImageSet.bad``."""
    files, chunks, bad = [], [], []
    with progress_bar("embedding images", console, transient=True) as progress:
        task = progress.add_task("images", total=len(paths))
        for pixels, indices, unreadable in iterate_images(paths, clip.preprocess, batch_size, clip.device):
            for item in unreadable:
                say(progress.console, f"warning: {item.message}")
                bad.append((item.path.name, item.message))
            if pixels is not None:
                chunks.append(clip.encode_images(pixels).cpu())
                files.extend(paths[i].name for i in indices)
            progress.advance(task, len(indices) + len(unreadable))
    embeddings = torch.cat(chunks) if chunks else torch.empty(0, 0)
    return ImageSet(files, embeddings, bad)


def probabilities(clip, image_embeddings, class_embeddings):
    """Softmax over classes of CLIP's scaled cosine similarity (its own logit scale, 100 for OpenAI)."""
    scale = clip.model.logit_scale.exp().float().cpu()
    return (scale * image_embeddings @ class_embeddings.cpu().T).softmax(dim=-1)


def ground_truth_from_names(files, labels):
    """Class ids from the course's ``{class_id}_{n}.png`` names."""
    truth = {}
    for name in files:
        match = GROUND_TRUTH_NAME.match(name)
        if not match:
            raise VlcapError(f"{name}: cannot read the true class from this file name (expected "
                             "{class_id}_{n}.png); pass --ground-truth CSV")
        truth[name] = int(match.group(1))
    return _check_known(truth, labels, "file names")


def load_ground_truth(path, files, labels):
    """A ``filename,label`` CSV (as the course's val_gt.csv) covering every classified image."""
    truth = {}
    for line, name, label in read_filename_label_csv(path, "ground-truth file"):
        try:
            truth[name] = int(label)
        except ValueError:
            raise VlcapError(f"{path}:{line}: label {label!r} is not an integer class id") from None
    missing = [name for name in files if name not in truth]
    if missing:
        raise VlcapError(f"{path}: no label for {len(missing)} image(s): {few(missing)}")
    return _check_known({name: truth[name] for name in files}, labels, str(path))


def _check_known(truth, labels, source):
    unknown = sorted({label for label in truth.values()} - set(labels.ids))
    if unknown:
        raise VlcapError(f"ground truth from {source} has class id(s) {few(unknown)} that are not in the "
                         "label file; pass the id2label.json these images were labelled with")
    return truth


def accuracy(probs, files, truth, labels):
    """Fraction of images whose most probable class is the true one."""
    predicted = [labels.ids[i] for i in probs.argmax(dim=-1).tolist()]
    correct = sum(p == truth[name] for p, name in zip(predicted, files))
    return correct, len(files)


def write_predictions(path, files, probs, labels):
    """``filename,label`` rows sorted by file name, written atomically."""
    predicted = [labels.ids[i] for i in probs.argmax(dim=-1).tolist()]
    write_csv(path, ["filename", "label"], sorted(zip(files, predicted)))


def sample(files, count, seed=0):
    """``count`` distinct indices into ``files``, reproducible for a seed."""
    return sorted(random.Random(seed).sample(range(len(files)), min(count, len(files))))


def plot_top5(image, probs, labels, path, title="", k=5):
    """Save the image beside a bar chart of its ``k`` most probable classes as a PNG (atomically).
    Returns the ``(class name, probability)`` pairs as drawn, best first."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend

    values, columns = probs.topk(min(k, len(labels.ids)))
    names = [labels.names[i] for i in columns.tolist()]
    figure = Figure(figsize=(8, 3.2), layout="constrained")
    left, right = figure.subplots(1, 2, width_ratios=[1, 1.6])
    left.imshow(image, interpolation="nearest")
    left.set_title(title, fontsize=9)
    left.axis("off")
    bars = right.barh(range(len(names))[::-1], values.tolist(), color="tab:blue")
    right.set_yticks(range(len(names))[::-1], names)
    right.set_xlim(0, 1)
    right.set_xlabel("probability")
    right.set_title(f"top-{len(names)} classes", fontsize=9)
    right.bar_label(bars, fmt="%.3f", padding=3, fontsize=8)
    with atomic_write(path, "wb") as f:
        figure.savefig(f, format="png", dpi=100)
    return [(name, bar.get_width()) for name, bar in zip(names, bars)]


@dataclass
class Request:
    """What ``vlcap classify`` was asked for, checked (``check_request``) before CLIP loads."""
    images_dir: Path
    labels: Labels
    templates: list  # ensembled for the predictions
    paths: list  # the images to classify
    truth: dict  # file name -> true class id, for the report (None without one)


@dataclass
class TemplateAccuracy:
    template: str  # a template, or "ensemble of N templates"
    correct: int
    total: int


@dataclass
class Classification:
    clip_name: str
    files: list  # file names of the images classified, in input order
    probs: torch.Tensor  # (len(files), classes): row i is files[i]'s class probabilities
    report: list  # TemplateAccuracy of each template, then of their ensemble; empty without a report
    plotted: int  # top-5 plots written


def check_request(images_dir, labels_file, templates=(), *, out=None, report=False, ground_truth=None,
                  plot_top5=None, out_dir=None):
    """Every input of ``run_classification`` read and checked, so a mistake is one ``VlcapError``
    before the (possibly large) model loads."""
    if not (out or report or plot_top5):
        raise VlcapError("nothing to do: pass --out pred.csv, --report and/or --plot-top5 N --out-dir DIR")
    if plot_top5 is not None and (plot_top5 < 1 or not out_dir):
        raise VlcapError("--plot-top5 N needs N >= 1 and --out-dir DIR for the PNGs")
    labels = load_labels(labels_file)
    templates = [check_template(t) for t in templates] or list(DEFAULT_TEMPLATES)
    paths = find_images(images_dir)
    names = [p.name for p in paths]
    truth = None
    if report:
        truth = load_ground_truth(ground_truth, names, labels) if ground_truth else ground_truth_from_names(names, labels)
    return Request(Path(images_dir), labels, templates, paths, truth)


def check_images_read(images, images_dir, skip_bad_images):
    """Fail on unreadable images unless ``skip_bad_images``; fail when none could be read."""
    if images.bad and not skip_bad_images:
        raise VlcapError(f"{len(images.bad)} unreadable image(s) in {images_dir}: {few(n for n, _ in images.bad)}; "
                         "fix or remove them, or pass --skip-bad-images to classify the rest")
    if not images.files:
        raise VlcapError(f"{images_dir}: none of the images could be read")


def template_report(clip, images, per_template, request):
    """The accuracy of each template's embeddings alone, then (several templates) of their ensemble."""
    rows = list(zip(request.templates, per_template))
    if len(rows) > 1:
        rows.append((f"ensemble of {len(rows)} templates", ensemble(per_template)))
    report = []
    for template, embeddings in rows:
        probs = probabilities(clip, images.embeddings, embeddings)
        report.append(TemplateAccuracy(template, *accuracy(probs, images.files, request.truth, request.labels)))
    return report


def plot_samples(request, files, probs, count, out_dir, seed=0):
    """Top-5 plots of ``count`` images sampled with ``seed``, as ``OUT_DIR/STEM_top5.png``
    (titled with the true class when the request has one). Returns how many were written."""
    chosen = sample(files, count, seed)
    for index in chosen:
        name = files[index]
        title = name
        if request.truth is not None:
            title = f"{name} (true: {request.labels.names[request.labels.ids.index(request.truth[name])]})"
        png = Path(out_dir) / f"{Path(name).stem}_top5.png"
        plot_top5(load_image(request.images_dir / name), probs[index], request.labels, png, title=title)
    return len(chosen)


def run_classification(images_dir, labels_file, templates=(), *, out=None, report=False, ground_truth=None,
                       plot_top5=None, out_dir=None, seed=0, clip_model=None, batch_size=128, device=None,
                       skip_bad_images=False, console=None, precision="auto"):
    """``vlcap classify``: check the inputs (``check_request``), load CLIP (``clip_model``, default
    ViT-L/14) on ``device`` in ``precision`` (``load_clip``'s), embed the images (progress on ``console``) and predict with the
    ensemble of ``templates``; then write the ``out`` CSV, compute the per-template ``report``
    and draw ``plot_top5`` plots into ``out_dir``, as asked. Unreadable images fail the run
    unless ``skip_bad_images``."""
    request = check_request(images_dir, labels_file, templates, out=out, report=report,
                            ground_truth=ground_truth, plot_top5=plot_top5, out_dir=out_dir)
    clip = clip_lib.load_clip(clip_model, device=device, default="ViT-L/14", precision=precision)
    images = encode_images(clip, request.paths, batch_size=batch_size, console=console)
    check_images_read(images, images_dir, skip_bad_images)
    per_template = [text_embeddings(clip, request.labels.names, t) for t in request.templates]
    probs = probabilities(clip, images.embeddings, ensemble(per_template))
    if out:
        write_predictions(out, images.files, probs, request.labels)
    accuracies = template_report(clip, images, per_template, request) if report else []
    plotted = plot_samples(request, images.files, probs, plot_top5, out_dir, seed) if plot_top5 else 0
    return Classification(clip.name, images.files, probs, accuracies, plotted)
