from vlcap.api import Metric, MetricScores, check_java, cider


class CiderMetric(Metric):
    name = "cider"
    title = "CIDEr"
    description = "CIDEr-D (PTB tokenization, n=4, sigma=6) via pycocoevalcap, as the course scores it; needs java"

    def check(self, config):
        check_java()

    def score(self, predictions, references, image_paths, config):
        result = cider(predictions, references)
        return MetricScores(result.score, result.per_image)
