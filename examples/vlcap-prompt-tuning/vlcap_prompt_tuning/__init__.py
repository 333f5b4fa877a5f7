"""vlcap plugins: soft prompt tuning (Lester et al., 2021), locally typical sampling (Meister
et al., 2023), the distinct-n metric and a `vlcap prompt-init` command. Installed next to vlcap,
they need no change to it."""
import vlcap

from vlcap_prompt_tuning import commands
from vlcap_prompt_tuning.distinct import DistinctN
from vlcap_prompt_tuning.method import PromptMethod
from vlcap_prompt_tuning.typical import TypicalSampling


@vlcap.hookimpl
def register_peft_methods(register):
    register(PromptMethod())


@vlcap.hookimpl
def register_decoding_strategies(register):
    register(TypicalSampling())


@vlcap.hookimpl
def register_metrics(register):
    register(DistinctN())


@vlcap.hookimpl
def register_commands(cli):
    commands.register(cli)
