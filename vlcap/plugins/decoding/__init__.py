"""vlcap's built-in decoding strategies."""
import vlcap
from vlcap.plugins.decoding.greedy import GreedyDecoding


@vlcap.hookimpl
def register_decoding_strategies(register):
    register(GreedyDecoding())
