from dataclasses import dataclass, field
from typing import Annotated, Union

from vlcap.api import Ge, Gt, Interval, Le

TARGETS = ("q", "k", "v", "attn_proj", "mlp")


@dataclass
class LoraConfig:
    r: Annotated[int, Ge(1), Le(16384)] = 8
    alpha: Annotated[int, Gt(0)] = 16
    dropout: Annotated[float, Interval(ge=0, lt=1)] = 0.05
    # q/k/v: the slices of the fused self-attention c_attn; attn_proj: its output projection;
    # mlp: both MLP linears. q+v is the LoRA paper's choice.
    targets: list[str] = field(default_factory=lambda: ["q", "v"])
    layers: Union[str, list] = "all"
