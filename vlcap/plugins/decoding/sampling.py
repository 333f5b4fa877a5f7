"""What the sampling strategies (top_k, top_p) share: temperature, seed and the loop."""
from dataclasses import dataclass
from typing import Annotated, Optional

from vlcap.api import DecodingStrategy, Gt, decode_token_by_token, make_generator, sample


@dataclass
class SamplingConfig:
    temperature: Annotated[float, Gt(0)] = 1.0
    seed: Optional[int] = None  # same seed, same model, same images: the same captions


class SamplingStrategy(DecodingStrategy):
    def keep(self, logits, config):
        """``logits`` with the tokens this strategy never samples set to -inf."""
        raise NotImplementedError

    def generate(self, model, config, *, start_id, end_id, max_length):
        generator = make_generator(config.seed, model.device)
        return decode_token_by_token(
            model, lambda logits: sample(self.keep(logits.float(), config), config.temperature, generator),
            start_id=start_id, end_id=end_id, max_length=max_length)
