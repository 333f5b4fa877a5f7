import loralib
from torch import nn

from vlcap.api import PeftMethod, VlcapError, keep_frozen, select_layers, swap_linear
from vlcap.plugins.peft_lora.config import CROSS_TARGETS, TARGETS, LoraConfig
from vlcap.plugins.peft_lora.layer import MergedLinear


class LoraMethod(PeftMethod):
    name = "lora"
    description = "LoRA: low-rank updates of self-attention (fused q/k/v), MLP and cross-attention weights (loralib)"
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
        layers = select_layers(config.layers, decoder.cfg.n_layer)
        cross = [t for t in config.targets if t in CROSS_TARGETS]
        if cross and all(decoder.h[i].cross_attn is None for i in layers):
            raise VlcapError(f"peft.options.targets: {', '.join(cross)} need cross-attention, but no layer in "
                             f"peft.options.layers has any (the connector adds none there); drop them")
        for i in layers:
            block = decoder.h[i]
            if block.cross_attn is not None:
                for target in cross:
                    self.adapt_cross_attention(block.cross_attn, CROSS_TARGETS[target], lora_args)
            if any(qkv):
                swap_linear(block.attn, "c_attn", MergedLinear(width, 3 * width, enable_lora=qkv, **lora_args))
            if "attn_proj" in config.targets:
                swap_linear(block.attn, "c_proj", loralib.Linear(width, width, **lora_args))
            if "mlp" in config.targets:
                swap_linear(block.mlp, "c_fc", loralib.Linear(width, 4 * width, **lora_args))
                swap_linear(block.mlp, "c_proj", loralib.Linear(4 * width, width, **lora_args))

    @staticmethod
    def adapt_cross_attention(attention, name, lora_args):
        """LoRA on a cross-attention projection: its base weights (new, random) are kept frozen,
        as loralib freezes the base it wraps; only the low-rank update trains."""
        old = getattr(attention, name)
        keep_frozen(old)
        swap_linear(attention, name, loralib.Linear(old.in_features, old.out_features, **lora_args))

    def merge(self, captioner):
        for module in captioner.modules():
            if isinstance(module, loralib.LoRALayer) and isinstance(module, nn.Linear):
                module.merge_weights = True
                module.train(False)  # loralib merges B@A into the weight on the switch to eval
