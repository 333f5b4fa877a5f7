from dataclasses import dataclass
from typing import Annotated

import torch

from vlcap.api import Interval
from vlcap.plugins.decoding.sampling import SamplingConfig, SamplingStrategy


@dataclass
class TopPConfig(SamplingConfig):
    p: Annotated[float, Interval(gt=0, le=1)] = 0.9


class NucleusSampling(SamplingStrategy):
    name = "top_p"
    description = "Nucleus (top-p) sampling: draw from the smallest set of tokens holding probability p"
    config_class = TopPConfig

    def keep(self, logits, config):
        # The nucleus is taken from the temperature-scaled distribution that is sampled from.
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = torch.softmax(sorted_logits / config.temperature, dim=-1)
        # A token is outside the nucleus if the tokens ranked above it already hold p
        # (so the most likely token is always kept).
        outside = probs.cumsum(-1) - probs >= config.p
        return logits.masked_fill(torch.zeros_like(outside).scatter(-1, order, outside), float("-inf"))
