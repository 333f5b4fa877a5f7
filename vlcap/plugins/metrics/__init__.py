"""vlcap's built-in caption metrics: CIDEr-D and CLIPScore, computed as the course scores them."""
import vlcap
from vlcap.plugins.metrics.cider import CiderMetric
from vlcap.plugins.metrics.clipscore import ClipScoreMetric


@vlcap.hookimpl
def register_metrics(register):
    register(CiderMetric())
    register(ClipScoreMetric())
