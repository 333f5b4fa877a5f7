"""Bottleneck adapters (Houlsby et al., 2019; Pfeiffer et al., 2020) in the decoder blocks."""
import vlcap
from vlcap.plugins.peft_adapter.method import AdapterMethod


@vlcap.hookimpl
def register_peft_methods(register):
    register(AdapterMethod())
