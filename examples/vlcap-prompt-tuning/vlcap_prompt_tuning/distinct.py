"""Distinct-n (Li et al., 2016): the share of a caption's n-grams that are distinct, a
reference-free measure of repetition ("a dog and a dog and a dog" scores low)."""
from dataclasses import dataclass

from vlcap.api import Metric, MetricScores, VlcapError


@dataclass
class DistinctConfig:
    n: int = 2


class DistinctN(Metric):
    name = "distinct"
    title = "distinct-n"
    description = "Distinct-n: distinct n-grams / n-grams, per caption and over the set (n; reference-free)"
    config_class = DistinctConfig
    uses_references = False  # the kit's perfect-caption check does not apply

    def check(self, config):
        if config.n < 1:
            raise VlcapError(f"distinct.n: must be >= 1, got {config.n}")

    def score(self, predictions, references, image_paths, config):
        grams = {stem: ngrams(caption, config.n) for stem, caption in predictions.items()}
        per_image = {stem: distinct(g) for stem, g in grams.items()}
        # Over the set: the captions' n-grams pooled, in a fixed order (the result must not
        # depend on the order of the dict).
        pooled = [g for stem in sorted(grams) for g in grams[stem]]
        return MetricScores(distinct(pooled), per_image)


def ngrams(caption, n):
    words = caption.lower().split()
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def distinct(grams):
    """1.0 for no n-gram at all (nothing repeats)."""
    return len(set(grams)) / len(grams) if grams else 1.0
