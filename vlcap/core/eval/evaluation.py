"""Caption evaluation exactly as the course scores it.

CIDEr: Stanford PTB tokenization (lower-case, punctuation removed) then coco-caption CIDEr-D
(n=4, sigma=6, IDF from the references being scored), both from ``pycocoevalcap``, the code
the course's evaluator calls. CLIPScore: 2.5 * max(cos(image, caption), 0) with OpenAI CLIP,
averaged over images. Training (validation metrics) and ``vlcap evaluate`` both come here.
"""
import contextlib
import functools
import os
import re
import shutil
import subprocess
import threading
import types
from dataclasses import dataclass
from pathlib import Path


from vlcap.core.data import RAISE, iterate_images, load_captions, read_json
from vlcap.core.errors import VlcapError, few
from vlcap.core.progress import progress_bar

JAVA_HINT = "install a Java runtime, e.g. apt-get install default-jre-headless"
# Characters Java's PTBTokenizer -preserveLines treats as line ends. pycocoevalcap replaces only
# "\n" and joins one caption per line, so any of the others would shift every later caption onto
# the wrong image; as whitespace inside a caption they tokenize the same as a space.
LINE_BREAKS = re.compile("[\r\n\x0b\x0c\u2028\u2029]")


@dataclass
class CiderResult:
    score: float  # the corpus CIDEr-D the course reports (mean over images)
    per_image: dict  # stem -> that image's CIDEr-D


@dataclass
class ClipScoreResult:
    score: float  # mean over images, as the course computes it
    per_image: dict  # stem -> 2.5 * max(cos, 0)
    truncated: list  # stems whose caption was cut to CLIP's 77-token context


def check_java():
    """pycocoevalcap's tokenizer runs ``java`` and writes temporary files next to its jar."""
    from pycocoevalcap.tokenizer import ptbtokenizer
    if shutil.which("java") is None:
        raise VlcapError(f"CIDEr needs Java for the Stanford PTB tokenizer, and 'java' is not on PATH: {JAVA_HINT}")
    jar_dir = Path(ptbtokenizer.__file__).parent
    if not os.access(jar_dir, os.W_OK):
        raise VlcapError(f"{jar_dir}: pycocoevalcap's PTB tokenizer writes its temporary files here and cannot; "
                         "install vlcap and its dependencies into a virtual environment you own")


def ptb_tokenize(captions):
    """``key -> list of captions`` -> ``key -> list of PTB-tokenized captions`` (one java run).

    Safe to call concurrently: each call writes its own uniquely named temporary file. Java's
    "PTBTokenizer tokenized N tokens at ..." line is captured, not printed into the terminal
    (where it would land in the middle of a live progress bar)."""
    from pycocoevalcap.tokenizer import ptbtokenizer
    check_java()
    with java_stderr_captured(ptbtokenizer):
        tokenized = ptbtokenizer.PTBTokenizer().tokenize(
            {key: [{"caption": LINE_BREAKS.sub(" ", text)} for text in texts] for key, texts in captions.items()})
    if any(len(tokenized.get(key, ())) != len(texts) for key, texts in captions.items()):
        raise VlcapError("the Stanford PTB tokenizer (java) returned fewer lines than it was given; run "
                         f"'java -version' to check the Java runtime works ({JAVA_HINT})")
    return tokenized


_JAVA_LOCK = threading.Lock()


@contextlib.contextmanager
def java_stderr_captured(module):
    """While inside, ``module`` (pycocoevalcap's tokenizer, which starts java with
    ``subprocess.Popen`` and lets its stderr through) starts processes with stderr piped: the
    tokenizer's ``communicate`` then collects and drops it. Only that module's name
    ``subprocess`` is replaced, for the duration of the call."""
    with _JAVA_LOCK:
        module.subprocess = types.SimpleNamespace(PIPE=subprocess.PIPE,
                                                  Popen=functools.partial(subprocess.Popen, stderr=subprocess.PIPE))
        try:
            yield
        finally:
            module.subprocess = subprocess


def check_predictions(predictions, references, where="predictions"):
    """The course's checks (a dict of strings whose keys are exactly the annotated image stems),
    but naming what is wrong."""
    if not isinstance(predictions, dict):
        raise VlcapError(f"{where}: expected a JSON object mapping image stem -> caption, "
                         f"got {type(predictions).__name__}")
    not_strings = [key for key, value in predictions.items() if not isinstance(value, str)]
    if not_strings:
        raise VlcapError(f"{where}: caption(s) must be strings; not a string for {len(not_strings)} image(s): "
                         f"{few(not_strings)}")
    if not references:
        raise VlcapError(f"{where}: the annotations have no captions to score against")
    missing = sorted(set(references) - set(predictions))
    extra = sorted(set(predictions) - set(references))
    if missing or extra:
        parts = ([f"{len(missing)} annotated image(s) have no prediction: {few(missing)}"] if missing else []) + \
                ([f"{len(extra)} prediction key(s) are not annotated images: {few(extra)}"] if extra else [])
        raise VlcapError(f"{where}: keys must be exactly the annotated image stems; " + "; ".join(parts))
    empty = [key for key, refs in references.items() if not refs]
    if empty:
        raise VlcapError(f"{where}: image(s) without reference captions cannot be scored: {few(empty)}")


def cider(predictions, references):
    """CIDEr-D of ``predictions`` (stem -> caption) against ``references`` (stem -> captions),
    computed as the course's evaluator does: predictions and references PTB-tokenized
    separately, then ``Cider().compute_score(references, predictions)`` in reference order."""
    from pycocoevalcap.cider.cider import Cider
    check_predictions(predictions, references)
    tokenized_predictions = ptb_tokenize({key: [predictions[key]] for key in references})
    tokenized_references = ptb_tokenize(references)
    score, scores = Cider().compute_score(tokenized_references, tokenized_predictions)
    return CiderResult(float(score), {key: float(s) for key, s in zip(tokenized_references, scores)})


def check_images(stems, image_paths, where="CLIPScore"):
    missing = [str(image_paths.get(s, s)) for s in stems if s not in image_paths or not Path(image_paths[s]).is_file()]
    if missing:
        raise VlcapError(f"{where}: {len(missing)} image file(s) missing: {few(missing)}")


def clip_scores(predictions, image_paths, clip, batch_size=64, num_workers=None, show_progress=True, console=None):
    """CLIPScore of each prediction (stem -> caption) on its image (stem -> path): 2.5 * max(cos, 0)
    with ``clip`` (a ``vlcap.core.eval.clip.Clip``), and the mean over images."""
    stems = list(predictions)
    check_images(stems, image_paths)
    batches = iterate_images([Path(image_paths[s]) for s in stems], clip.preprocess, batch_size, clip.device,
                             unreadable=RAISE, num_workers=num_workers)
    per_image = {}
    with progress_bar("CLIPScore", console, transient=True, disable=not show_progress) as progress:
        task = progress.add_task("clipscore", total=len(stems))
        for pixels, indices, _ in batches:
            batch = [stems[i] for i in indices]
            cos = (clip.encode_images(pixels) * clip.encode_texts([predictions[s] for s in batch])).sum(-1)
            per_image.update(zip(batch, (2.5 * cos.clamp(min=0)).tolist()))
            progress.advance(task, len(batch))
    # Summed in prediction order like the course's loop, so the mean matches it to the last digit.
    score = sum(per_image[s] for s in stems) / len(stems) if stems else float("nan")
    truncated = [s for s in stems if clip.is_too_long(predictions[s])]
    return ClipScoreResult(score, {s: per_image[s] for s in stems}, truncated)


def load_predictions(path):
    """The course's prediction file: one JSON object, image stem -> caption."""
    return read_json(path, "prediction file", "a JSON object of image stem -> caption")


def image_paths_for(caption_set, image_dir):
    """stem -> image file in ``image_dir``, named as in the annotations."""
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise VlcapError(f"{image_dir}: image folder not found")
    return {Path(name).stem: image_dir / name for name in caption_set.images.values()}


@dataclass
class Evaluation:
    images: int
    predictions: dict  # stem -> caption
    cider: CiderResult
    clipscore: ClipScoreResult = None
    clip_model: str = None


def evaluate_files(pred_path, annotations_path, image_dir=None, clipscore=True, clip_model=None, batch_size=64,
                   console=None, precision="auto"):
    """Validate the prediction file against the annotations (naming the file at fault), then score
    CIDEr and, with ``clipscore``, CLIPScore on the images in ``image_dir`` (CLIP in ``precision``,
    ``load_clip``'s). Everything that can
    fail fast (inputs, java, images, loading CLIP) is checked before anything is scored."""
    from vlcap.core.eval.clip import load_clip
    predictions = load_predictions(pred_path)
    caption_set = load_captions(annotations_path)
    references = caption_set.references()
    check_predictions(predictions, references, where=f"{pred_path} (against {annotations_path})")
    check_java()
    clip = image_paths = None
    if clipscore:
        if image_dir is None:
            raise VlcapError("CLIPScore needs the images: pass --images DIR (or --no-clipscore)")
        image_paths = image_paths_for(caption_set, image_dir)
        check_images(references, image_paths, where=f"{annotations_path} (images in {image_dir})")
        try:
            clip = load_clip(clip_model, precision=precision)
        except VlcapError as exc:
            raise VlcapError(f"{exc}; or score CIDEr alone with --no-clipscore") from None
    result = Evaluation(len(references), predictions, cider(predictions, references))
    if clip is not None:
        result.clipscore = clip_scores(predictions, image_paths, clip, batch_size=batch_size, console=console)
        result.clip_model = clip.name
    return result
