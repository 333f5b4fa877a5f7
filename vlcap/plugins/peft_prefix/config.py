from dataclasses import dataclass
from typing import Annotated, Union

from vlcap.api import Ge, Le


@dataclass
class PrefixConfig:
    length: Annotated[int, Ge(1), Le(4096)] = 10
    # Li & Liang train the prefixes through an MLP for stability, then keep only its output;
    # vlcap does the same: the MLP exists during training and is dropped at save time.
    reparam: bool = True
    hidden: Annotated[int, Ge(1), Le(65536)] = 128  # MLP width (GPT-2-small, 12 layers: ~2.5M training-time parameters)
    layers: Union[str, list] = "all"
