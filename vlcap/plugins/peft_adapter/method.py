from vlcap.api import PeftMethod, VlcapError, select_layers
from vlcap.plugins.peft_adapter.config import PLACEMENTS, SLOTS, AdapterConfig
from vlcap.plugins.peft_adapter.layer import Adapter


class AdapterMethod(PeftMethod):
    name = "adapter"
    description = "Bottleneck adapters after decoder sub-layers (Houlsby, Pfeiffer, or after cross-attention too)"
    config_class = AdapterConfig
    zero_init = True  # the up-projection starts at zero

    def apply(self, captioner, config):
        sublayers = placement_sublayers(config.placement)
        decoder = captioner.decoder
        width = decoder.cfg.n_embd
        if not 1 <= config.reduction <= width:
            raise VlcapError(f"peft.options.reduction: must be between 1 and {width}, got {config.reduction}")
        layers = select_layers(config.layers, decoder.cfg.n_layer)
        if "cross_attn" in sublayers and all(decoder.h[i].cross_attn is None for i in layers):
            raise VlcapError("peft.options.placement: cross_attn needs cross-attention, but no layer in "
                             "peft.options.layers has any (the connector adds none there); choose another placement")
        for i in layers:
            block = decoder.h[i]
            for sublayer in sublayers:
                if sublayer == "cross_attn" and block.cross_attn is None:
                    continue  # a layer the connector gave no cross-attention
                setattr(block, SLOTS[sublayer], Adapter(width, width // config.reduction, config.activation))


def placement_sublayers(placement):
    """``placement`` (a name of PLACEMENTS or a list of SLOTS keys) -> the sub-layers to adapt."""
    if isinstance(placement, str) and placement in PLACEMENTS:
        return PLACEMENTS[placement]
    if isinstance(placement, list) and placement and all(p in SLOTS for p in placement):
        return tuple(dict.fromkeys(placement))
    raise VlcapError(f"peft.options.placement: {placement!r} is not one of {', '.join(PLACEMENTS)} nor a list of "
                     f"{', '.join(SLOTS)}")
