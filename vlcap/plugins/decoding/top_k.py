from dataclasses import dataclass

from vlcap.api import VlcapError
from vlcap.plugins.decoding.sampling import SamplingConfig, SamplingStrategy


@dataclass
class TopKConfig(SamplingConfig):
    k: int = 50


class TopKSampling(SamplingStrategy):
    name = "top_k"
    description = "Top-k sampling: draw from the k most likely tokens (temperature, seed)"
    config_class = TopKConfig

    def check(self, config):
        super().check(config)
        if config.k < 1:
            raise VlcapError(f"decoding.options.k: must be >= 1, got {config.k}")

    def keep(self, logits, config):
        kth = logits.topk(min(config.k, logits.size(-1)), dim=-1).values[:, -1:]
        return logits.masked_fill(logits < kth, float("-inf"))
