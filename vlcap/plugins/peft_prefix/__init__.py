"""Prefix tuning (Li & Liang, 2021): trainable key/value prefixes in every self-attention."""
import vlcap
from vlcap.plugins.peft_prefix.method import PrefixMethod


@vlcap.hookimpl
def register_peft_methods(register):
    register(PrefixMethod())
