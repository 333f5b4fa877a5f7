from dataclasses import dataclass
from typing import Annotated

from vlcap.api import Ge
from vlcap.plugins.decoding.sampling import SamplingConfig, SamplingStrategy


@dataclass
class TopKConfig(SamplingConfig):
    k: Annotated[int, Ge(1)] = 50


class TopKSampling(SamplingStrategy):
    name = "top_k"
    description = "Top-k sampling: draw from the k most likely tokens (temperature, seed)"
    config_class = TopKConfig

    def keep(self, logits, config):
        kth = logits.topk(min(config.k, logits.size(-1)), dim=-1).values[:, -1:]
        return logits.masked_fill(logits < kth, float("-inf"))
