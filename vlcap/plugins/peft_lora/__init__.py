"""LoRA (Hu et al., 2021) on the decoder's self-attention and MLP, with loralib layers."""
import vlcap
from vlcap.plugins.peft_lora.method import LoraMethod


@vlcap.hookimpl
def register_peft_methods(register):
    register(LoraMethod())
