"""Caption metrics are plugins (CIDEr, CLIPScore, ... register through ``register_metrics``);
the trainer reports the ones named in ``train.metrics`` on the validation set after each epoch
and can select the best checkpoint by one of them."""


class Metric:
    name = ""
    description = ""
    higher_is_better = True

    def check(self):
        """Raise ``VlcapError`` if the metric cannot run here (a missing runtime, model, ...).
        Called before training starts, so a run does not fail after its first epoch."""

    def compute(self, predictions, references, image_paths):
        """``predictions``: stem -> caption; ``references``: stem -> list of captions;
        ``image_paths``: stem -> image file. Returns one score for the whole set."""
        raise NotImplementedError
