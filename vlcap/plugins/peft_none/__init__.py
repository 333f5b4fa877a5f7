"""``--peft none``: no PEFT method, the connector alone trains (the course's first baseline:
encoder + connector should already beat the simple baseline)."""
import vlcap
from vlcap.api import PeftMethod


class NoMethod(PeftMethod):
    name = "none"
    description = "No PEFT method: only the connector (projection, cross-attention) trains"
    zero_init = True  # changes nothing
    adds_parameters = False

    def apply(self, captioner, config):
        pass


@vlcap.hookimpl
def register_peft_methods(register):
    register(NoMethod())
