from rich.console import Console

from vlcap.api import CLIP_MODEL_ENV, Metric, clip_scores, load_clip


class ClipScoreMetric(Metric):
    name = "clipscore"
    description = f"CLIPScore 2.5*max(cos,0) with OpenAI CLIP (ViT-B/32, or ${CLIP_MODEL_ENV}), as the course scores it"

    def __init__(self):
        self._clip = None

    def check(self):
        self._load()

    def compute(self, predictions, references, image_paths):
        # No progress bar: the trainer's own live display is on screen.
        result = clip_scores(predictions, image_paths, self._load(), show_progress=False)
        if result.truncated:
            Console(stderr=True).print(f"[yellow]CLIPScore: {len(result.truncated)} caption(s) longer than CLIP's "
                                       "77 tokens were truncated[/]")
        return result.score

    def _load(self):
        if self._clip is None:  # loaded once per process, on first use: the model is large
            self._clip = load_clip()
        return self._clip
