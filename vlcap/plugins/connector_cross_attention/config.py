from dataclasses import dataclass
from typing import Union


@dataclass
class CrossAttentionConfig:
    # Which decoder layers get a cross-attention block: "all" or layer indices (negative from the
    # top). Each costs ~2.4M trainable parameters on GPT-2 small: fewer layers leave more of the
    # 35M budget to the PEFT method.
    layers: Union[str, list] = "all"
