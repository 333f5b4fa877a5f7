from dataclasses import dataclass
from typing import Annotated, Literal, Optional

from vlcap.api import Ge, Interval, Le

PROJECTORS = ("linear", "mlp")


@dataclass
class VisualTokensConfig:
    # "mlp": LLaVA-1.5's Linear -> GELU -> Linear; "linear": LLaVA-1's single Linear.
    projector: Literal[PROJECTORS] = "mlp"
    hidden: Optional[Annotated[int, Ge(1), Le(65536)]] = None  # the MLP's hidden width; None: the decoder width
    dropout: Annotated[float, Interval(ge=0, lt=1)] = 0.0  # on the projected tokens, in training only (0.1 in a course report)
    # Token reduction: keep the CLS/register tokens and average-pool the patch grid to grid x grid
    # (e.g. 4: 1 + 16 tokens instead of 1 + 256 for ViT-L/14); None keeps every token.
    grid: Optional[Annotated[int, Ge(1), Le(1024)]] = None
    # Whether the image tokens take GPT-2 position embeddings. Default True, as ClipCap and LLaVA
    # feed them (the decoder reads image + text as one sequence; the text starts after them);
    # False leaves them unpositioned and the text at the positions it has without an image.
    position_embeddings: bool = True
