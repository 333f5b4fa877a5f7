"""Locally typical sampling (Meister et al., 2023): sample among the tokens whose surprisal is
closest to the distribution's entropy, the smallest such set holding probability ``mass``."""
from dataclasses import dataclass
from typing import Optional

import torch

from vlcap.api import DecodingStrategy, VlcapError, decode_token_by_token, make_generator, sample


@dataclass
class TypicalConfig:
    mass: float = 0.95
    temperature: float = 1.0
    seed: Optional[int] = None  # same seed, same model, same images: the same captions


class TypicalSampling(DecodingStrategy):
    name = "typical"
    description = "Locally typical sampling: tokens whose surprisal is near the entropy (mass, temperature, seed)"
    config_class = TypicalConfig

    def generate(self, model, config, *, start_id, end_id, max_length):
        if not 0 < config.mass <= 1:
            raise VlcapError(f"decoding.options.mass: must be in (0, 1], got {config.mass}")
        if config.temperature <= 0:
            raise VlcapError(f"decoding.options.temperature: must be > 0, got {config.temperature}")
        generator = make_generator(config.seed, model.device)
        return decode_token_by_token(
            model, lambda logits: sample(typical(logits.float(), config.mass), config.temperature, generator),
            start_id=start_id, end_id=end_id, max_length=max_length)


def typical(logits, mass):
    """``logits`` with every token outside the typical set set to -inf."""
    logprobs = torch.log_softmax(logits, dim=-1)
    probs = logprobs.exp()
    entropy = -(probs * logprobs.nan_to_num(neginf=0.0)).sum(-1, keepdim=True)
    distance, order = (-logprobs - entropy).abs().sort(dim=-1)
    sorted_probs = probs.gather(-1, order)
    # A token is outside if the tokens closer to the entropy already hold `mass` (the closest is kept).
    outside = sorted_probs.cumsum(-1) - sorted_probs >= mass
    return logits.masked_fill(torch.zeros_like(outside).scatter(-1, order, outside), float("-inf"))
