from dataclasses import dataclass
from typing import Union

# Which sub-layer outputs get an adapter: Houlsby puts one after self-attention and one after
# the MLP; Pfeiffer only after the MLP (half the parameters, about the same quality).
PLACEMENTS = {"houlsby": ("post_attn", "post_mlp"), "pfeiffer": ("post_mlp",)}


@dataclass
class AdapterConfig:
    placement: str = "houlsby"
    reduction: int = 16  # bottleneck width = n_embd // reduction
    activation: str = "gelu"
    layers: Union[str, list] = "all"
