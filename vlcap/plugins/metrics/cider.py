from vlcap.api import Metric, check_java, cider


class CiderMetric(Metric):
    name = "cider"
    description = "CIDEr-D (PTB tokenization, n=4, sigma=6) via pycocoevalcap, as the course scores it; needs java"

    def check(self):
        check_java()

    def compute(self, predictions, references, image_paths):
        return cider(predictions, references).score
