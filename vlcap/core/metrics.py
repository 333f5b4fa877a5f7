"""Caption metrics are plugins (CIDEr, CLIPScore, ... register through ``register_metrics``);
the trainer reports every installed metric on the validation set and can select the best
checkpoint by one of them."""


class Metric:
    name = ""
    description = ""
    higher_is_better = True

    def compute(self, predictions, references, image_paths):
        """``predictions``: stem -> caption; ``references``: stem -> list of captions;
        ``image_paths``: stem -> image file. Returns one score for the whole set."""
        raise NotImplementedError
