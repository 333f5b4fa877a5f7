import os
from dataclasses import dataclass
from typing import Annotated, Literal, Optional

from vlcap.api import CLIP_MODEL_ENV, Ge, Le, Metric, MetricScores, clip_scores, load_clip


@dataclass
class ClipScoreConfig:
    # OpenAI CLIP name (ViT-B/32, ViT-L/14, ...) or a local OpenAI-format file; None: $VLCAP_CLIP_MODEL,
    # else ViT-B/32 as the course
    model: Optional[str] = None
    batch_size: Annotated[int, Ge(1), Le(65536)] = 64  # images per CLIP pass
    # CLIP's weights: auto is clip.load's (fp16 on CUDA, as the course evaluator; fp32 on CPU)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"


class ClipScoreMetric(Metric):
    name = "clipscore"
    title = "CLIPScore"
    description = f"CLIPScore 2.5*max(cos,0) with OpenAI CLIP (ViT-B/32, or ${CLIP_MODEL_ENV}), as the course scores it"
    config_class = ClipScoreConfig
    uses_references = False
    needs_images = True

    def __init__(self):
        self._clips = {}

    def check(self, config):
        self._load(config.model, config.precision)

    def score(self, predictions, references, image_paths, config):
        clip = self._load(config.model, config.precision)
        result = clip_scores(predictions, image_paths, clip, batch_size=config.batch_size, show_progress=False)
        notes = [f"{len(result.truncated)} caption(s) longer than CLIP's 77 tokens were truncated for CLIPScore "
                 f"(the course's script stops on them): {', '.join(result.truncated[:4])}"] if result.truncated else []
        return MetricScores(result.score, result.per_image, notes, {"clip_model": clip.name,
                                                                     "truncated": result.truncated})

    def _load(self, model, precision):
        key = (model or os.environ.get(CLIP_MODEL_ENV), precision)  # what load_clip(None) would load
        if key not in self._clips:  # loaded once per process, model and precision, on first use: it is large
            self._clips[key] = load_clip(model, precision=precision)
        return self._clips[key]
