"""``vlcap report``: a static HTML page about one run's captions, opened from disk.

The report folder holds ``index.html`` and everything it shows: thumbnails of the validation
images (``images/``), the run's curves (``curves.png``), the best and worst images' cross-attention
maps (``attention/``, drawn by ``vlcap.apps.visualize``), the captions scored (``predictions.json``)
and the per-image scores (``scores.csv``). No server, no script or style from elsewhere; every
text from a file (captions, references, file names, config values) is HTML-escaped. The folder is
built beside its destination and renamed into place, so a failure never leaves half a report.

Captions come from the run's checkpoint (``RUN_DIR/best.safetensors`` or ``--checkpoint``), or
from a prediction file alone (``--predictions``, e.g. zero-shot captions); scores are those of
``vlcap evaluate`` (``vlcap.apps.evaluation``).
"""
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from vlcap.apps import compare as compare_lib
from vlcap.apps import html_page
from vlcap.apps.evaluation import evaluate_predictions
from vlcap.apps.visualize import Target, visualize
from vlcap.core import config as config_lib
from vlcap.core.data import load_captions, load_image
from vlcap.core.errors import VlcapError, few
from vlcap.core.eval.evaluation import check_images, check_predictions, image_paths_for, load_predictions
from vlcap.core.infer.captioning import caption_paths
from vlcap.core.model.checkpoint import load_checkpoint
from vlcap.core.model.peft import count_parameters
from vlcap.core.outputs import write_predictions
from vlcap.core.progress import progress_bar
from vlcap.core.runtime import resolve_device

THUMBNAIL = 256  # longest side of a gallery image, pixels


@dataclass
class ReportImage:
    stem: str
    thumbnail: str  # path relative to the report folder
    caption: str
    references: list
    cider: float
    clipscore: Optional[float]


@dataclass
class Report:
    """What ``index.html`` shows; ``html_page.render`` turns it into the page."""
    title: str
    source: str  # where the captions came from
    images: list  # ReportImage, best first
    scores: dict  # metric -> corpus score
    clip_model: Optional[str] = None
    config_rows: list = field(default_factory=list)  # (key, value)
    parameter_rows: list = field(default_factory=list)  # (part, trainable, frozen)
    curves: Optional[str] = None
    attention: list = field(default_factory=list)  # (kind, ReportImage, png path or None)
    notes: list = field(default_factory=list)


def flatten(tree, prefix=""):
    """A nested config dict as ``(dotted key, value)`` rows."""
    rows = []
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            rows += flatten(value, f"{prefix}{key}.")
        else:
            rows.append((f"{prefix}{key}", value))
    return rows


def check_out_dir(out):
    """A new folder, an empty one, or an earlier report (which is replaced); never anything else."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "index.html").is_file())):
        raise VlcapError(f"{out}: exists and is not an earlier vlcap report; choose a new or empty folder for --out")


def captions_for(run_dir, predictions_path, checkpoint, references, image_paths, registry, work, decoding,
                 decoder_weights, device, console):
    """``(predictions path, loaded checkpoint or None, source)``: the prediction file as given
    (checked against the annotations), or the checkpoint's captions of every annotated image,
    written to ``work/predictions.json``."""
    loaded = None
    if checkpoint is not None:
        loaded = load_checkpoint(checkpoint, registry, decoder_weights=decoder_weights, device=device)
    if predictions_path is not None:
        check_predictions(load_predictions(predictions_path), references, where=str(predictions_path))
        return Path(predictions_path), loaded, f"captions from {predictions_path}"
    stems = list(references)
    result = caption_paths(loaded, [Path(image_paths[s]) for s in stems], registry, console=console, **decoding)
    if result.bad_images:
        raise VlcapError(f"{len(result.bad_images)} annotated image(s) could not be read, so the report would "
                         f"miss them: {few(result.bad_images, 2)}")
    path = work / "predictions.json"
    write_predictions(path, {s: result.predictions[s] for s in stems})
    return path, loaded, f"captions by {checkpoint}"


def write_thumbnails(rows, image_paths, references, folder, progress):
    """A JPEG thumbnail per scored image, named by its rank (file stems may hold any character)."""
    folder.mkdir()
    task = progress.add_task("thumbnails", total=len(rows))
    images = []
    for index, row in enumerate(rows):
        image = load_image(image_paths[row["stem"]])
        image.thumbnail((THUMBNAIL, THUMBNAIL))
        name = f"{index:05d}.jpg"
        image.save(folder / name, format="JPEG", quality=85)
        images.append(ReportImage(row["stem"], f"{folder.name}/{name}", row["caption"], references[row["stem"]],
                                  row["cider"], row["clipscore"]))
        progress.advance(task)
    return images


def draw_best_and_worst(loaded, images, image_paths, top, registry, folder, progress):
    """The ``top`` best and worst images (``images`` is best first), each with the cross-attention
    of its scored caption, teacher-forced, when a checkpoint is at hand."""
    chosen = [("best", rank, image) for rank, image in enumerate(images[:top], 1)]
    chosen += [("worst", rank, image) for rank, image in enumerate(images[::-1][:min(top, max(len(images) - top, 0))], 1)]
    if loaded is None:
        return [(kind, image, None) for kind, _, image in chosen]
    folder.mkdir()
    task = progress.add_task("attention maps", total=len(chosen))
    drawn = []
    for kind, rank, image in chosen:
        target = Target(Path(image_paths[image.stem]), f"{kind}-{rank}", image.caption)
        figure = visualize(loaded, [target], folder, registry)[0]
        drawn.append((kind, image, f"{folder.name}/{figure.png.name}"))
        progress.advance(task)
    return drawn


def run_sections(report, run_dir, loaded, registry, work):
    """The run's config, parameters and curves (when there is a run directory and a checkpoint)."""
    if run_dir is not None:
        comparison = compare_lib.compare_runs([run_dir], registry)
        run = comparison.runs[0]
        report.config_rows = flatten(run.config)
        report.notes.append(f"run {run_dir}: {run.status}, {len(run.history)} epoch(s) recorded")
        if run.history:
            compare_lib.plot_curves(work / "curves.png", comparison)
            report.curves = "curves.png"
    if loaded is not None:
        counts = count_parameters(loaded.captioner)
        report.parameter_rows = [(part, t, f) for part, (t, f) in sorted(counts.groups.items())]
        report.parameter_rows.append(("total", counts.trainable, counts.frozen))
        if run_dir is None:
            report.config_rows = flatten(config_lib.to_dict(loaded.config))


def build_report(out, registry, *, image_dir, annotations_path, run_dir=None, predictions_path=None,
                 checkpoint=None, decoder_weights=None, decoding=None, clipscore=True, clip_model=None, top=3,
                 batch_size=64, device="cpu", console=None):
    """Write the report folder ``out`` (see the module's docstring) and return its ``Report``.
    ``decoding``: ``caption_paths``'s keyword options (strategy, options, max_length, batch_size)."""
    if run_dir is None and predictions_path is None:
        raise VlcapError("nothing to report: pass a RUN_DIR (its checkpoint captions the images) or --predictions FILE")
    if run_dir is not None:
        compare_lib.read_run_config(run_dir)  # a run directory, checked before anything loads
        best = Path(run_dir) / "best.safetensors"
        if checkpoint is None and best.is_file():
            checkpoint = best
        elif checkpoint is None and predictions_path is None:
            raise VlcapError(f"{run_dir}: no best.safetensors to caption with (no epoch finished); "
                             "pass --checkpoint or --predictions")
    check_out_dir(out)
    caption_set = load_captions(annotations_path)
    references = caption_set.references()
    image_paths = image_paths_for(caption_set, image_dir)
    check_images(references, image_paths, where=f"{annotations_path} (images in {image_dir})")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        report = assemble(work, registry, run_dir, predictions_path, checkpoint, references, image_paths,
                          annotations_path, image_dir, decoding or {}, decoder_weights, clipscore, clip_model, top,
                          batch_size, resolve_device(device), console)
        (work / "index.html").write_text(html_page.render(report), encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        work.rename(out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return report


def assemble(work, registry, run_dir, predictions_path, checkpoint, references, image_paths, annotations_path,
             image_dir, decoding, decoder_weights, clipscore, clip_model, top, batch_size, device, console):
    pred_path, loaded, source = captions_for(run_dir, predictions_path, checkpoint, references, image_paths,
                                             registry, work, decoding, decoder_weights, device, console)
    scored = evaluate_predictions(pred_path, annotations_path, image_dir, clipscore=clipscore,
                                  clip_model=clip_model, batch_size=batch_size, per_image_path=work / "scores.csv",
                                  console=console)
    evaluation = scored.evaluation
    scores = {"CIDEr": evaluation.cider.score}
    if evaluation.clipscore:
        scores["CLIPScore"] = evaluation.clipscore.score
    title = f"vlcap report: {run_dir if run_dir is not None else predictions_path}"
    report = Report(title, source, [], scores, evaluation.clip_model)
    with progress_bar(console=console) as progress:
        report.images = write_thumbnails(scored.rows, image_paths, references, work / "images", progress)
        report.attention = draw_best_and_worst(loaded, report.images, image_paths, top, registry,
                                               work / "attention", progress)
    run_sections(report, run_dir, loaded, registry, work)
    if loaded is None:
        report.notes.append("no checkpoint: attention maps need one (pass the RUN_DIR or --checkpoint)")
    return report
