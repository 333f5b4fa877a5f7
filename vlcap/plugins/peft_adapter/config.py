from dataclasses import dataclass
from typing import Annotated, Literal, Union

from vlcap.api import Ge, Le

# The sub-layers whose output can pass through an adapter, by their block slot.
SLOTS = {"attn": "post_attn", "cross_attn": "post_cross_attn", "mlp": "post_mlp"}
# Named placements: Houlsby puts one after self-attention and one after the MLP; Pfeiffer only
# after the MLP (half the parameters, about the same quality); "houlsby+cross" adds one after a
# cross-attention connector's sub-layer (a course report's best was after self- and cross-attention).
PLACEMENTS = {"houlsby": ("attn", "mlp"), "pfeiffer": ("mlp",), "houlsby+cross": ("attn", "cross_attn", "mlp")}


@dataclass
class AdapterConfig:
    # a name of PLACEMENTS, or a list of SLOTS keys
    placement: Union[Literal[tuple(PLACEMENTS)], list[Literal[tuple(SLOTS)]]] = "houlsby"
    reduction: Annotated[int, Ge(1), Le(16384)] = 16  # bottleneck width = n_embd // reduction
    activation: Literal["gelu", "relu", "silu"] = "gelu"  # the keys of layer.ACTIVATIONS
    layers: Union[str, list] = "all"
