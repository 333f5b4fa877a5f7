from dataclasses import dataclass
from typing import Annotated, Literal, Union

from vlcap.api import Ge, Le

# Which sub-layer outputs get an adapter: Houlsby puts one after self-attention and one after
# the MLP; Pfeiffer only after the MLP (half the parameters, about the same quality).
PLACEMENTS = {"houlsby": ("post_attn", "post_mlp"), "pfeiffer": ("post_mlp",)}


@dataclass
class AdapterConfig:
    placement: Literal[tuple(PLACEMENTS)] = "houlsby"
    reduction: Annotated[int, Ge(1), Le(16384)] = 16  # bottleneck width = n_embd // reduction
    activation: Literal["gelu", "relu", "silu"] = "gelu"  # the keys of layer.ACTIVATIONS
    layers: Union[str, list] = "all"
