"""vlcap plugins: soft prompt tuning (Lester et al., 2021) and locally typical sampling
(Meister et al., 2023). Installed next to vlcap, they need no change to it."""
import vlcap

from vlcap_prompt_tuning.method import PromptMethod
from vlcap_prompt_tuning.typical import TypicalSampling


@vlcap.hookimpl
def register_peft_methods(register):
    register(PromptMethod())


@vlcap.hookimpl
def register_decoding_strategies(register):
    register(TypicalSampling())
