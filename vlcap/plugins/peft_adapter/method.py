from vlcap.api import PeftMethod, VlcapError, select_layers
from vlcap.plugins.peft_adapter.config import PLACEMENTS, AdapterConfig
from vlcap.plugins.peft_adapter.layer import Adapter


class AdapterMethod(PeftMethod):
    name = "adapter"
    description = "Bottleneck adapters after decoder sub-layers (Houlsby or Pfeiffer placement)"
    config_class = AdapterConfig
    zero_init = True  # the up-projection starts at zero

    def apply(self, captioner, config):
        width = captioner.decoder.cfg.n_embd
        if not 1 <= config.reduction <= width:
            raise VlcapError(f"peft.options.reduction: must be between 1 and {width}, got {config.reduction}")
        for i in select_layers(config.layers, captioner.decoder.cfg.n_layer):
            for slot in PLACEMENTS[config.placement]:
                setattr(captioner.decoder.h[i], slot, Adapter(width, width // config.reduction, config.activation))
