"""Caption metrics are plugins (CIDEr, CLIPScore, BLEU, ... register through ``register_metrics``):
this module is their interface and the one place that runs one and checks what it returned.
``vlcap evaluate --metric NAME`` scores a prediction file with any of them; the trainer reports
the ones named in ``train.metrics`` on the validation set after each epoch and can select the best
checkpoint by one of them."""
import math
from dataclasses import dataclass, field

from vlcap.core.config import plugin_config
from vlcap.core.errors import VlcapError, few
from vlcap.core.plugins import plugin_call


@dataclass
class MetricScores:
    """What a metric returns: the corpus ``score`` (the number reported for the whole set) and
    ``per_image`` (stem -> that image's score, for every predicted image; how the corpus score
    follows from them is the metric's own: a mean for CIDEr and CLIPScore, not for BLEU).
    ``notes``: one-line remarks for the user (e.g. captions CLIP had to truncate); ``details``:
    JSON-able facts about the run (the CLIP model used), both shown by ``vlcap evaluate``."""
    score: float
    per_image: dict
    notes: list = field(default_factory=list)
    details: dict = field(default_factory=dict)


class Metric:
    """Base class for metric plugins: set the class attributes and implement ``score``."""
    name = ""
    title = ""  # how tables name it ("CIDEr"); the name when empty
    description = ""
    higher_is_better = True
    config_class = None  # a dataclass of the metric's options, all with defaults (or None)
    uses_references = True  # False for a reference-free metric (CLIPScore scores against the image)
    needs_images = False  # True if ``score`` reads ``image_paths``

    def check(self, config):
        """Raise ``VlcapError`` if the metric cannot run here (a missing runtime, model, ...).
        Called before any scoring (and before training starts, so a run does not fail after its
        first epoch)."""

    def score(self, predictions, references, image_paths, config):
        """``predictions``: stem -> caption; ``references``: stem -> list of captions (the same
        stems); ``image_paths``: stem -> image file (only when ``needs_images``, else empty);
        ``config``: the ``config_class`` instance. Returns ``MetricScores``; must not depend on
        the order of the dicts."""
        legacy = " (compute(), which returned one number, is the interface before per-image scores)" \
            if hasattr(self, "compute") else ""
        raise VlcapError(f"metric '{self.name}' does not implement score(predictions, references, image_paths, "
                         f"config) returning MetricScores{legacy}; see docs/plugins.md")


def check_metric_runs(metric, config):
    """``metric.check(config)``: a ``VlcapError`` says why it cannot run here; anything else it
    raises is one line naming the plugin."""
    with plugin_call(metric, "check"):
        metric.check(config)


def metric_config(metric, options, where="metric options"):
    """A metric's options dict -> its ``config_class`` instance (None if it takes none)."""
    return plugin_config(metric, options, where)


def run_metric(metric, config, predictions, references, image_paths=None):
    """``metric.score`` on the set, its result checked: a ``MetricScores`` with a number for the
    corpus and one for every predicted image (else one line naming the metric)."""
    with plugin_call(metric, "score"):
        result = metric.score(predictions, references, image_paths or {}, config)
    label = f"metric '{metric.name}'"
    if not isinstance(result, MetricScores):
        raise VlcapError(f"{label} returned {type(result).__name__}, not MetricScores(score, per_image); "
                         "fix or uninstall the plugin that provides it")
    if not is_number(result.score):
        raise VlcapError(f"{label} returned the corpus score {result.score!r}, not a number")
    if not isinstance(result.per_image, dict) or set(result.per_image) != set(predictions):
        got = set(result.per_image) if isinstance(result.per_image, dict) else set()
        missing, extra = sorted(set(predictions) - got), sorted(got - set(predictions))
        raise VlcapError(f"{label} returned per-image scores that are not one per predicted image "
                         f"(missing: {few(missing) or 'none'}; extra: {few(extra) or 'none'})")
    bad = sorted(stem for stem, value in result.per_image.items() if not is_number(value))
    if bad:
        raise VlcapError(f"{label} returned a per-image score that is not a number for {few(bad)}")
    result.score = float(result.score)
    result.per_image = {stem: float(result.per_image[stem]) for stem in predictions}
    return result


def is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isinf(value)
