import loralib
from torch import nn

from vlcap.api import PeftMethod, VlcapError, select_layers, swap_linear
from vlcap.plugins.peft_lora.config import TARGETS, LoraConfig
from vlcap.plugins.peft_lora.layer import MergedLinear


class LoraMethod(PeftMethod):
    name = "lora"
    description = "LoRA: low-rank updates of self-attention (fused q/k/v) and MLP weights (loralib)"
    config_class = LoraConfig
    can_merge = True
    zero_init = True  # lora_B starts at zero

    def apply(self, captioner, config):
        unknown = sorted(set(config.targets) - set(TARGETS))
        if unknown or not config.targets:
            raise VlcapError(f"peft.options.targets: {unknown or 'empty'} is not valid; choose from {', '.join(TARGETS)}")
        decoder = captioner.decoder
        width = decoder.cfg.n_embd
        # merge_weights=False: loralib would otherwise merge/unmerge on every eval()/train()
        # switch, accumulating float error in the frozen weights; we merge once, on request.
        lora_args = dict(r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout, merge_weights=False)
        qkv = [t in config.targets for t in ("q", "k", "v")]
        for i in select_layers(config.layers, decoder.cfg.n_layer):
            block = decoder.h[i]
            if any(qkv):
                swap_linear(block.attn, "c_attn", MergedLinear(width, 3 * width, enable_lora=qkv, **lora_args))
            if "attn_proj" in config.targets:
                swap_linear(block.attn, "c_proj", loralib.Linear(width, width, **lora_args))
            if "mlp" in config.targets:
                swap_linear(block.mlp, "c_fc", loralib.Linear(width, 4 * width, **lora_args))
                swap_linear(block.mlp, "c_proj", loralib.Linear(4 * width, width, **lora_args))

    def merge(self, captioner):
        for module in captioner.modules():
            if isinstance(module, loralib.LoRALayer) and isinstance(module, nn.Linear):
                module.merge_weights = True
                module.train(False)  # loralib merges B@A into the weight on the switch to eval
