from dataclasses import dataclass, field
from typing import Annotated, Union

from vlcap.api import Ge, Gt, Interval, Le

# q/k/v: the slices of the fused self-attention c_attn; attn_proj: its output projection; mlp: both
# MLP linears. cross_q/cross_k/cross_v/cross_proj: a cross-attention connector's projections, whose
# own weights then stay frozen at their random init and only the low-rank update trains (as
# loralib freezes the base it wraps, and as course reports trained them): far fewer parameters.
SELF_TARGETS = ("q", "k", "v", "attn_proj", "mlp")
CROSS_TARGETS = {"cross_q": "q", "cross_k": "k", "cross_v": "v", "cross_proj": "c_proj"}
TARGETS = SELF_TARGETS + tuple(CROSS_TARGETS)


@dataclass
class LoraConfig:
    r: Annotated[int, Ge(1), Le(16384)] = 8
    alpha: Annotated[int, Gt(0)] = 16
    dropout: Annotated[float, Interval(ge=0, lt=1)] = 0.05
    targets: list[str] = field(default_factory=lambda: ["q", "v"])  # of TARGETS; q+v is the LoRA paper's choice
    layers: Union[str, list] = "all"
