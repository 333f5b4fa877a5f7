import dataclasses
import functools

from vlcap.api import PeftMethod, select_layers, trainable_state
from vlcap.plugins.peft_prefix.config import PrefixConfig
from vlcap.plugins.peft_prefix.layer import PrefixTable


class PrefixMethod(PeftMethod):
    name = "prefix"
    description = "Prefix tuning: trainable per-layer key/value prefixes (optional MLP reparameterisation)"
    config_class = PrefixConfig

    def apply(self, captioner, config):
        decoder = captioner.decoder
        layers = select_layers(config.layers, decoder.cfg.n_layer)
        table = PrefixTable(len(layers), decoder.cfg.n_head, decoder.cfg.n_embd,
                            config.length, config.reparam, config.hidden)
        captioner.peft["prefix"] = table
        for index, layer in enumerate(layers):
            decoder.h[layer].attn.kv_prefix = functools.partial(table.layer_kv, index)

    def export(self, captioner, config):
        if not config.reparam:
            return super().export(captioner, config)
        # Save only the MLP's output: the same prefixes, a fraction of the parameters, and a
        # checkpoint that loads as the direct (reparam=False) form.
        state = {k: v for k, v in trainable_state(captioner).items() if not k.startswith("peft.prefix.")}
        state["peft.prefix.kv"] = captioner.peft["prefix"].table().detach()
        return state, dataclasses.replace(config, reparam=False)
