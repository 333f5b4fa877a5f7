"""``vlcap evaluate``: score a prediction file (``vlcap.core.eval.evaluation``) and rank its images."""
from dataclasses import dataclass

from vlcap.core.eval.evaluation import Evaluation, evaluate_files
from vlcap.core.outputs import write_csv

PER_IMAGE_COLUMNS = ("stem", "caption", "clipscore", "cider")


@dataclass
class ScoredPredictions:
    evaluation: Evaluation
    rows: list  # one dict per image with PER_IMAGE_COLUMNS, best first (see per_image_rows)


def per_image_rows(evaluation):
    """One row per image, best first (by CLIPScore when it was computed, else by CIDEr)."""
    clip = evaluation.clipscore
    order = clip.per_image if clip else evaluation.cider.per_image
    stems = sorted(order, key=lambda s: -order[s])
    return [{"stem": s, "caption": evaluation.predictions[s], "clipscore": clip.per_image[s] if clip else None,
             "cider": evaluation.cider.per_image[s]} for s in stems]


def evaluate_predictions(pred_path, annotations_path, image_dir=None, *, clipscore=True, clip_model=None,
                         batch_size=64, per_image_path=None, console=None, precision="auto"):
    """Score ``pred_path`` against ``annotations_path`` as ``evaluate_files`` does (CIDEr, and
    CLIPScore on the images in ``image_dir`` with ``clipscore``, CLIP in ``precision``); with ``per_image_path``, also
    write the per-image rows there as CSV (atomically). Returns the scores and the ranked rows."""
    evaluation = evaluate_files(pred_path, annotations_path, image_dir, clipscore=clipscore,
                                clip_model=clip_model, batch_size=batch_size, console=console, precision=precision)
    rows = per_image_rows(evaluation)
    if per_image_path:
        write_csv(per_image_path, PER_IMAGE_COLUMNS, ([row[c] for c in PER_IMAGE_COLUMNS] for row in rows))
    return ScoredPredictions(evaluation, rows)
