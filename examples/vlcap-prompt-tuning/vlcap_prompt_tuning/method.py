import torch

from vlcap.api import PeftMethod, Tokenizer, VlcapError
from vlcap_prompt_tuning.config import INITS, PromptConfig
from vlcap_prompt_tuning.layer import SoftPrompt


class PromptMethod(PeftMethod):
    name = "prompt"
    description = "Soft prompt tuning: trainable input embeddings before the caption (init: vocab or text)"
    config_class = PromptConfig
    can_merge = False  # the prompt is an input, not a weight update
    zero_init = False  # the prompt changes what the decoder sees from the first step

    def apply(self, captioner, config):
        if config.length < 1:
            raise VlcapError(f"peft.options.length: must be >= 1, got {config.length}")
        if config.init not in INITS:
            raise VlcapError(f"peft.options.init: '{config.init}' is not one of {', '.join(INITS)}")
        decoder = captioner.decoder
        wte = decoder.wte.weight
        if config.init == "text":
            ids = Tokenizer().encode(config.text)  # GPT-2's BPE, the decoder's vocabulary
            if not ids:
                raise VlcapError("peft.options.text: empty; give the words the prompt starts from")
            ids = torch.tensor((ids * config.length)[:config.length], device=wte.device)
        else:
            # build_captioner runs apply under the run's seed, so this draw is reproducible.
            ids = torch.randint(0, wte.size(0), (config.length,), device=wte.device)
        captioner.peft["prompt"] = SoftPrompt(wte[ids])
        decoder.input_prefix = captioner.peft["prompt"]
