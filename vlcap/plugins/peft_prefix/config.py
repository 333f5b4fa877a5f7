from dataclasses import dataclass
from typing import Union


@dataclass
class PrefixConfig:
    length: int = 10
    # Li & Liang train the prefixes through an MLP for stability, then keep only its output;
    # vlcap does the same: the MLP exists during training and is dropped at save time.
    reparam: bool = True
    hidden: int = 128  # MLP width (GPT-2-small, 12 layers: ~2.5M training-time parameters)
    layers: Union[str, list] = "all"
