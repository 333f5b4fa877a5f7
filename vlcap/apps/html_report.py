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


@dataclass
class ReportInputs:
    """What ``vlcap report`` was asked for (its options, by name)."""
    image_dir: Path
    annotations_path: Path
    run_dir: Optional[Path] = None
    predictions_path: Optional[Path] = None
    checkpoint: Optional[Path] = None  # default: RUN_DIR/best.safetensors
    decoder_weights: Optional[Path] = None
    decoding: dict = field(default_factory=dict)  # caption_paths's options: strategy, options, max_length, batch_size
    clipscore: bool = True
    clip_model: Optional[str] = None
    top: int = 3
    batch_size: int = 64
    device: str = "cpu"

    def check(self):
        """Every choice that can be refused without loading anything; fills in the checkpoint."""
        if self.run_dir is None and self.predictions_path is None:
            raise VlcapError("nothing to report: pass a RUN_DIR (its checkpoint captions the images) "
                             "or --predictions FILE")
        if self.run_dir is not None:
            compare_lib.read_run_config(self.run_dir)
            best = Path(self.run_dir) / "best.safetensors"
            if self.checkpoint is None and best.is_file():
                self.checkpoint = best
            elif self.checkpoint is None and self.predictions_path is None:
                raise VlcapError(f"{self.run_dir}: no best.safetensors to caption with (no epoch finished); "
                                 "pass --checkpoint or --predictions")


def captions_for(inputs, references, image_paths, registry, work, console):
    """``(predictions path, loaded checkpoint or None, source)``: the prediction file as given
    (checked against the annotations), or the checkpoint's captions of every annotated image,
    written to ``work/predictions.json``."""
    loaded = None
    if inputs.checkpoint is not None:
        loaded = load_checkpoint(inputs.checkpoint, registry, decoder_weights=inputs.decoder_weights,
                                 device=resolve_device(inputs.device))
    if inputs.predictions_path is not None:
        check_predictions(load_predictions(inputs.predictions_path), references, where=str(inputs.predictions_path))
        return Path(inputs.predictions_path), loaded, f"captions from {inputs.predictions_path}"
    stems = list(references)
    result = caption_paths(loaded, [Path(image_paths[s]) for s in stems], registry, console=console,
                           **inputs.decoding)
    if result.bad_images:
        raise VlcapError(f"{len(result.bad_images)} annotated image(s) could not be read, so the report would "
                         f"miss them: {few(result.bad_images, 2)}")
    path = work / "predictions.json"
    write_predictions(path, {s: result.predictions[s] for s in stems})
    return path, loaded, f"captions by {inputs.checkpoint}"


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
                                  row["cider"], row.get("clipscore")))
        progress.advance(task)
    return images


def draw_best_and_worst(loaded, images, image_paths, top, registry, folder, progress):
    """The ``top`` best and worst images (``images`` is best first), each with the cross-attention
    of its scored caption, teacher-forced, when a checkpoint is at hand."""
    chosen = [("best", rank, image) for rank, image in enumerate(images[:top], 1)]
    worst = images[::-1][:min(top, max(len(images) - top, 0))]  # never an image shown as best too
    chosen += [("worst", rank, image) for rank, image in enumerate(worst, 1)]
    if loaded is None:
        return [(kind, image, None) for kind, _, image in chosen]
    folder.mkdir()
    task = progress.add_task("attention maps", total=len(chosen))
    drawn = []
    for kind, rank, image in chosen:
        score = f"CLIPScore {image.clipscore:.4f}" if image.clipscore is not None else f"CIDEr {image.cider:.4f}"
        target = Target(Path(image_paths[image.stem]), f"{kind}-{rank}", image.caption, f"{kind} {rank}: {score}")
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


def build_report(out, inputs, registry, console=None):
    """Write the report folder ``out`` for ``inputs`` (a ``ReportInputs``; see the module's
    docstring) and return its ``Report``. Inputs are checked before anything loads."""
    inputs.check()
    check_out_dir(out)
    caption_set = load_captions(inputs.annotations_path)
    references = caption_set.references()
    image_paths = image_paths_for(caption_set, inputs.image_dir)
    check_images(references, image_paths, where=f"{inputs.annotations_path} (images in {inputs.image_dir})")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        report = assemble(work, inputs, references, image_paths, registry, console)
        (work / "index.html").write_text(html_page.render(report), encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        work.rename(out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return report


def assemble(work, inputs, references, image_paths, registry, console):
    """Everything the page shows, written into ``work``; returns the ``Report``."""
    pred_path, loaded, source = captions_for(inputs, references, image_paths, registry, work, console)
    clip_options = {"model": inputs.clip_model, "batch_size": inputs.batch_size}
    options = {"clipscore": {k: v for k, v in clip_options.items() if v is not None}} if inputs.clipscore else {}
    scored = evaluate_predictions(pred_path, inputs.annotations_path, registry, inputs.image_dir, options=options,
                                  no_clipscore=not inputs.clipscore, per_image_path=work / "scores.csv")
    evaluation = scored.evaluation
    scores = {"CIDEr": evaluation.cider.score}
    clip_model = None
    if "clipscore" in evaluation.scores:
        scores["CLIPScore"] = evaluation.clipscore.score
        clip_model = evaluation.clipscore.details.get("clip_model")
    title = f"vlcap report: {inputs.run_dir if inputs.run_dir is not None else inputs.predictions_path}"
    report = Report(title, source, [], scores, clip_model)
    with progress_bar(console=console) as progress:
        report.images = write_thumbnails(scored.rows, image_paths, references, work / "images", progress)
        report.attention = draw_best_and_worst(loaded, report.images, image_paths, inputs.top, registry,
                                               work / "attention", progress)
    run_sections(report, inputs.run_dir, loaded, registry, work)
    if loaded is None:
        report.notes.append("no checkpoint: attention maps need one (pass the RUN_DIR or --checkpoint)")
    return report
