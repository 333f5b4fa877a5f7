"""vlcap's built-in decoding strategies."""
import vlcap
from vlcap.plugins.decoding.beam import BeamSearch
from vlcap.plugins.decoding.greedy import GreedyDecoding
from vlcap.plugins.decoding.top_k import TopKSampling
from vlcap.plugins.decoding.top_p import NucleusSampling


@vlcap.hookimpl
def register_decoding_strategies(register):
    for strategy in (GreedyDecoding(), BeamSearch(), TopKSampling(), NucleusSampling()):
        register(strategy)
