"""The conformance kit's metric checks: a small fixed caption set with images, scored the way
``vlcap evaluate`` scores (``run_metric``, which also refuses a malformed result). A metric whose
``check`` says it cannot run here (no java, no CLIP model) skips, naming why."""
import math
import tempfile
from pathlib import Path

import pytest
from PIL import Image

from vlcap.core.errors import VlcapError
from vlcap.core.eval.metrics import metric_config, run_metric

# stem -> (references, colour of its image). Different subjects, so one image's caption is a
# wrong caption for every other image.
CAPTIONS = {
    "kit0": (["a red bus parked on a city street", "a red double decker bus on the street",
              "a big red bus stopped by the road"], (200, 30, 30)),
    "kit1": (["two dogs running across a sandy beach", "a pair of dogs playing on the beach",
              "dogs run along the sand by the sea"], (220, 200, 120)),
    "kit2": (["a bowl of fruit on a wooden table", "apples and bananas in a bowl on a table",
              "a wooden table with a fruit bowl on it"], (150, 90, 40)),
    "kit3": (["a man riding a bicycle down a hill", "a cyclist rides his bike downhill",
              "a person on a bike going down a slope"], (40, 120, 200)),
}


def kit_images(folder):
    """stem -> a small PNG per kit image (a plain colour), written into ``folder``."""
    paths = {}
    for stem, (_, colour) in CAPTIONS.items():
        paths[stem] = Path(folder) / f"{stem}.png"
        Image.new("RGB", (32, 32), colour).save(paths[stem])
    return paths


def prepared(name, registry, options):
    """``(metric, config)``, or a skip when the metric cannot run here."""
    metric = registry.get("metric", name)
    config = metric_config(metric, options, f"metric options ({name})")
    try:
        metric.check(config)
    except VlcapError as exc:
        pytest.skip(f"metric '{name}' cannot run here: {exc}")
    return metric, config


def score(metric, config, predictions, references, folder):
    images = kit_images(folder) if metric.needs_images else {}
    return run_metric(metric, config, predictions, references, {s: images[s] for s in predictions} if images else {})


def references_for(stems):
    return {s: list(CAPTIONS[s][0]) for s in stems}


def better_or_equal(metric, a, b):
    return a >= b - 1e-9 if metric.higher_is_better else a <= b + 1e-9


def check_perfect_caption(name, registry, options):
    """A caption equal to one of the image's references scores at least as well as another
    image's caption, for every image, and strictly better over the set (skipped for a
    reference-free metric, ``uses_references = False``)."""
    metric, config = prepared(name, registry, options)
    if not metric.uses_references:
        pytest.skip(f"metric '{name}' does not score against references")
    stems = list(CAPTIONS)
    references = references_for(stems)
    perfect = {s: references[s][0] for s in stems}
    wrong = {s: references[stems[(i + 1) % len(stems)]][0] for i, s in enumerate(stems)}
    with tempfile.TemporaryDirectory() as tmp:
        good, bad = (score(metric, config, p, references, tmp) for p in (perfect, wrong))
    for s in stems:
        assert better_or_equal(metric, good.per_image[s], bad.per_image[s]), \
            f"'{name}': {s}'s own reference scores {good.per_image[s]}, another image's caption {bad.per_image[s]}"
    assert good.score != bad.score and better_or_equal(metric, good.score, bad.score), \
        f"'{name}': perfect captions score {good.score} over the set, wrong ones {bad.score}"


def check_order_independence(name, registry, options):
    """The same captions in another order of the dicts give the same corpus and per-image scores."""
    metric, config = prepared(name, registry, options)
    stems = list(CAPTIONS)
    references = references_for(stems)
    predictions = {s: references[stems[(i + 2) % len(stems)]][1] if i % 2 else references[s][2]
                   for i, s in enumerate(stems)}
    with tempfile.TemporaryDirectory() as tmp:
        forward = score(metric, config, predictions, references, tmp)
        backward = score(metric, config, dict(reversed(predictions.items())), dict(reversed(references.items())), tmp)
    assert math.isclose(forward.score, backward.score, rel_tol=1e-9, abs_tol=1e-9), \
        f"'{name}': the corpus score depends on the order of the images ({forward.score} vs {backward.score})"
    for s in stems:
        assert math.isclose(forward.per_image[s], backward.per_image[s], rel_tol=1e-9, abs_tol=1e-9), \
            f"'{name}': {s}'s score depends on the order of the images"


def check_per_image_consistency(name, registry, options):
    """One per-image score per predicted image (``run_metric`` refuses anything else), and a set
    of one image scores that image's per-image score."""
    metric, config = prepared(name, registry, options)
    stems = list(CAPTIONS)
    references = references_for(stems)
    predictions = {s: references[s][1] for s in stems}
    with tempfile.TemporaryDirectory() as tmp:
        for s in stems[:2]:
            alone = score(metric, config, {s: predictions[s]}, {s: references[s]}, tmp)
            assert math.isclose(alone.score, alone.per_image[s], rel_tol=1e-6, abs_tol=1e-9), \
                f"'{name}': a set of the one image {s} scores {alone.score}, its per-image score is {alone.per_image[s]}"


METRIC_CHECKS = {
    "perfect_caption": check_perfect_caption,
    "order_independence": check_order_independence,
    "per_image_consistency": check_per_image_consistency,
}
