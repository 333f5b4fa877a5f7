from dataclasses import dataclass, field
from typing import Union

TARGETS = ("q", "k", "v", "attn_proj", "mlp")


@dataclass
class LoraConfig:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    # q/k/v: the slices of the fused self-attention c_attn; attn_proj: its output projection;
    # mlp: both MLP linears. q+v is the LoRA paper's choice.
    targets: list = field(default_factory=lambda: ["q", "v"])
    layers: Union[str, list] = "all"
