"""Comparing prompts and generation options of a transformers model in one command
(`vlcap caption --hf-model M --prompt A --prompt B --set num_beams=1 --set num_beams=2 --out-dir D
[--annotations J --report]`).

The settings are the product of the prompts and of each ``--set`` key's values (a key given
twice with two values is an axis; a key given once applies to every setting), or of a small YAML
grid file. The model loads once; each setting's captions are saved as ``D/setting-N.json`` (the
course's format) as soon as they are made, ``D/settings.json`` says which setting each file is,
and with ``--report`` each setting is scored by vlcap's evaluation code (CIDEr and CLIPScore, as
``vlcap evaluate``) into ``D/report.json`` and ``D/report.csv``.
"""
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from vlcap.apps.hf_captioning import (caption_with_hf, check_generation_options, check_prompt, load_hf_model,
                                      options_text)
from vlcap.core.atomic import atomic_write
from vlcap.core.config import load_yaml, read_yaml
from vlcap.core.data import find_images, load_captions, load_image
from vlcap.core.errors import VlcapError
from vlcap.core.eval.clip import load_clip
from vlcap.core.eval.evaluation import check_images, check_java, cider, clip_scores, image_paths_for
from vlcap.core.outputs import write_csv, write_predictions

REPORT_COLUMNS = ("setting", "prompt", "generation", "cider", "clipscore", "captions", "predictions")


@dataclass
class Setting:
    name: str  # "1", "2", ...: its predictions are setting-NAME.json
    prompt: str
    options: dict  # generation options (GenerationConfig keys) of this setting only

    @property
    def generation(self):
        """The options as typed: ``num_beams=2 max_new_tokens=30``."""
        return options_text(self.options)


def parse_assignments(assignments):
    """``--set KEY=VALUE`` items -> ``{key: [values]}`` in the order given; values parsed as YAML
    scalars (``2`` an int, ``true`` a bool); a key given again with another value gains an axis
    value, the same value twice counts once."""
    axes = {}
    for item in assignments:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise VlcapError(f"--set {item!r}: expected KEY=VALUE, e.g. --set num_beams=2")
        values = axes.setdefault(key, [])
        value = read_yaml(raw) if raw else None
        if value not in values:
            values.append(value)
    return axes


def read_grid(path):
    """A YAML grid: ``prompt`` (a string or a list of them) and generation options, each a value
    or a list of values to compare (a list-valued option such as ``stop_strings`` is written as a
    list of lists)."""
    grid = load_yaml(path)
    prompts = grid.pop("prompt", None)
    prompts = [prompts] if isinstance(prompts, str) else prompts
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise VlcapError(f"{path}: give 'prompt:' as a string or a list of strings (the instructions to compare)")
    axes = {key: value if isinstance(value, list) else [value] for key, value in grid.items()}
    empty = [key for key, values in axes.items() if not values]
    if empty:
        raise VlcapError(f"{path}: {', '.join(empty)}: an empty list gives no setting; give at least one value")
    return prompts, axes


def settings_grid(prompts=(), assignments=(), grid_file=None):
    """The settings to run: every combination of the prompts and of each option's values, from
    ``--prompt``/``--set`` or from ``grid_file`` (not both), each checked before anything loads."""
    if grid_file is not None:
        if prompts or assignments:
            raise VlcapError("--grid holds the prompts and generation options; drop --prompt and --set")
        prompts, axes = read_grid(grid_file)
    else:
        axes = parse_assignments(assignments)
    if not prompts:
        raise VlcapError("--prompt: give the instruction, e.g. --prompt \"Describe the image in one sentence.\"")
    keys = list(axes)
    settings = [Setting(str(n), prompt, dict(zip(keys, values)))
                for n, (prompt, *values) in enumerate(itertools.product(prompts, *axes.values()), 1)]
    for setting in settings:
        check_prompt(setting.prompt)
        check_generation_options(setting.options, where=f"{grid_file}:" if grid_file is not None else "--set")
    return settings


def check_outputs(settings, out=None, out_dir=None, report=False, annotations_path=None, image_dir=None,
                  clip_model=None):
    """Where the captions go: one setting without ``report`` into ``out`` (a prediction file),
    anything else into ``out_dir``; the scoring inputs only with ``report``. One line otherwise."""
    if (annotations_path or image_dir or clip_model) and not report:
        raise VlcapError("--annotations, --images and --clip-model are for --report; add --report")
    if report and not annotations_path:
        raise VlcapError("--report scores against reference captions: pass --annotations val.json")
    if len(settings) == 1 and not report:
        if out_dir or not out:
            raise VlcapError("one setting writes one prediction file: pass --out pred.json (--out-dir is for "
                             "several settings or --report)")
    elif out or not out_dir:
        raise VlcapError(f"{len(settings)} setting(s){' with --report' if report else ''} write one file each: pass "
                         "--out-dir DIR instead of --out")


class Scorer:
    """CIDEr and CLIPScore of a setting's predictions against ``annotations_path``, with the
    images in ``image_dir``: everything that can fail (annotations, image files, java, CLIP) is
    checked when it is built, before any caption is generated."""

    def __init__(self, annotations_path, image_dir, clip_model=None, console=None):
        caption_set = load_captions(annotations_path)
        self.references = caption_set.references()
        if not self.references:
            raise VlcapError(f"{annotations_path}: no captions to score against")
        self.image_paths = image_paths_for(caption_set, image_dir)
        check_images(self.references, self.image_paths, where=f"{annotations_path} (images in {image_dir})")
        for stem in self.references:  # a caption missing for an unreadable image could not be scored
            load_image(self.image_paths[stem])
        check_java()
        try:
            self.clip = load_clip(clip_model)
        except VlcapError as exc:
            raise VlcapError(f"{exc} (CLIPScore of --report)") from None
        self.console = console

    @property
    def paths(self):
        """The annotated images, the ones each setting captions."""
        return [Path(self.image_paths[stem]) for stem in self.references]

    def score(self, predictions):
        """``(cider, clipscore)`` of ``predictions`` (stem -> caption)."""
        return (cider(predictions, self.references).score,
                clip_scores(predictions, self.image_paths, self.clip, console=self.console).score)


@dataclass
class SettingResult:
    setting: Setting
    predictions: Path
    captions: int
    bad_images: list
    cider: Optional[float] = None
    clipscore: Optional[float] = None

    def as_dict(self):
        return {"setting": self.setting.name, "prompt": self.setting.prompt, "generation": self.setting.options,
                "cider": self.cider, "clipscore": self.clipscore, "captions": self.captions,
                "predictions": str(self.predictions)}


@dataclass
class Comparison:
    model: str
    out_dir: Path
    results: list = field(default_factory=list)
    clip_model: Optional[str] = None  # set when the settings were scored
    images: int = 0

    @property
    def bad_images(self):
        return sorted({message for result in self.results for message in result.bad_images})

    def as_dict(self):
        return {"model": self.model, "images": self.images, "clip_model": self.clip_model,
                "settings": [result.as_dict() for result in self.results]}


def write_comparison(comparison, report):
    """``settings.json`` (and with ``report`` ``report.json`` + ``report.csv``), atomically,
    after every setting: a run stopped half-way keeps what it finished."""
    with atomic_write(comparison.out_dir / "settings.json", "w") as f:
        json.dump(comparison.as_dict(), f, ensure_ascii=False, indent=1)
    if report:
        with atomic_write(comparison.out_dir / "report.json", "w") as f:
            json.dump(comparison.as_dict(), f, ensure_ascii=False, indent=1)
        rows = [r.as_dict() for r in comparison.results]
        write_csv(comparison.out_dir / "report.csv", REPORT_COLUMNS,
                  ([row[c] if c != "generation" else r.setting.generation for c in REPORT_COLUMNS]
                   for r, row in zip(comparison.results, rows)))


def compare_settings(images_dir, model, out_dir, settings, *, device, quantize=None, first_sentence=False,
                     batch_size=8, annotations_path=None, image_dir=None, clip_model=None, console=None):
    """Caption with each of ``settings`` (from ``settings_grid``) and save each setting's
    predictions in ``out_dir``. With ``annotations_path`` (``--report``), the annotated images in
    ``image_dir`` (default ``images_dir``) are the ones captioned, and each setting is scored.
    Returns the ``Comparison``."""
    out_dir = Path(out_dir)
    scorer = None
    if annotations_path is not None:
        scorer = Scorer(annotations_path, image_dir or images_dir, clip_model, console=console)
        paths = scorer.paths
    else:
        paths = find_images(images_dir, unique_stems=True)
    hf = load_hf_model(model, device, quantize=quantize)
    comparison = Comparison(hf.name, out_dir, images=len(paths), clip_model=scorer.clip.name if scorer else None)
    for setting in settings:
        captions = caption_with_hf(hf, paths, setting.prompt, setting.options, first_sentence=first_sentence,
                                   batch_size=batch_size, console=console,
                                   label=f"setting {setting.name}/{len(settings)}")
        result = SettingResult(setting, out_dir / f"setting-{setting.name}.json", len(captions.predictions),
                               captions.bad_images)
        write_predictions(result.predictions, captions.predictions)
        if scorer is not None:
            result.cider, result.clipscore = scorer.score(captions.predictions)
        comparison.results.append(result)
        write_comparison(comparison, report=scorer is not None)
    return comparison
