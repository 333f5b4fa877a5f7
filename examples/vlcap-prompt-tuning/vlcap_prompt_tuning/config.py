from dataclasses import dataclass

INITS = ("vocab", "text")


@dataclass
class PromptConfig:
    length: int = 10  # P: trainable embeddings placed before the caption
    # "vocab": each prompt vector starts as the embedding of a random vocabulary token (seeded by
    # the run's model.init_seed); "text": as the embeddings of `text`'s GPT-2 tokens, repeated
    # to fill `length` (Lester et al. found both far better than random vectors).
    init: str = "vocab"
    text: str = "a photo of"
