"""``vlcap evaluate``: score a prediction file with metric plugins (``vlcap.core.eval.evaluation``)
and rank its images."""
from dataclasses import dataclass

from vlcap.core.errors import VlcapError
from vlcap.core.eval.evaluation import Evaluation, evaluate_files
from vlcap.core.outputs import write_csv

# What `vlcap evaluate` scores without --metric: the course's pair. Images are ranked by the
# first of RANK_PREFERENCE that was scored, else by the first metric asked for.
DEFAULT_METRICS = ("cider", "clipscore")
RANK_PREFERENCE = ("clipscore",)


@dataclass
class ScoredPredictions:
    evaluation: Evaluation
    rank_by: str  # the metric the rows are ranked by
    columns: tuple  # the per-image CSV's columns: stem, caption, rank_by, then the other metrics in order
    rows: list  # one dict per image with ``columns``, best first (see per_image_rows)


def metric_choice(metrics=None, no_clipscore=False):
    """The metric names to score: those asked for (``--metric``, in order), else the default pair;
    ``no_clipscore`` leaves CLIPScore out (the course's CIDEr alone)."""
    names = list(metrics) if metrics else list(DEFAULT_METRICS)
    if no_clipscore:
        names = [n for n in names if n != "clipscore"]
    return names


def how_to_leave_out(name, metrics):
    """The flag that scores without metric ``name``: ``--no-clipscore`` for CLIPScore from the
    default pair, else dropping its ``--metric``."""
    return "--no-clipscore" if name == "clipscore" and not metrics else f"drop --metric {name}"


def per_image_rows(evaluation, rank_by):
    """The CSV columns and one row per image, best first by ``rank_by`` (its ``higher_is_better``)."""
    names = [rank_by, *(n for n in evaluation.scores if n != rank_by)]
    order = evaluation.scores[rank_by].per_image
    sign = -1 if evaluation.metrics[rank_by].higher_is_better else 1
    stems = sorted(order, key=lambda s: sign * order[s])
    rows = [{"stem": s, "caption": evaluation.predictions[s],
             **{n: evaluation.scores[n].per_image[s] for n in names}} for s in stems]
    return ("stem", "caption", *names), rows


def evaluate_predictions(pred_path, annotations_path, registry, image_dir=None, *, metrics=None, options=None,
                         no_clipscore=False, rank_by=None, per_image_path=None):
    """Score ``pred_path`` against ``annotations_path`` with the metrics asked for (default: CIDEr
    and CLIPScore; ``options``: metric name -> its options), the images in ``image_dir`` for those
    that need them; with ``per_image_path``, also write every metric's per-image scores there as
    CSV (atomically). Returns the scores and the ranked rows."""
    names = metric_choice(metrics, no_clipscore)
    if rank_by is not None and rank_by not in names:  # before any scoring
        raise VlcapError(f"--rank-by {rank_by}: not scored here (scoring: {', '.join(names) or 'nothing'}); "
                         f"add --metric {rank_by}")
    evaluation = evaluate_files(pred_path, annotations_path, registry, names, options, image_dir,
                                leave_out=lambda name: how_to_leave_out(name, metrics))
    rank_by = rank_by or next((n for n in RANK_PREFERENCE if n in names), names[0])
    columns, rows = per_image_rows(evaluation, rank_by)
    if per_image_path:
        write_csv(per_image_path, columns, ([row[c] for c in columns] for row in rows))
    return ScoredPredictions(evaluation, rank_by, columns, rows)
