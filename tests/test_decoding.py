"""Decoding strategies: every option cached == full recompute, beam search finds the best caption,
sampling is seeded (per-plugin cache, beam-1 and merge checks: the conformance kit)."""
import itertools
import json
import math

import pytest
import torch
from click.testing import CliRunner

from conftest import install_package, tiny_config
from vlcap.cli import main
from vlcap.core.model.captioner import build_captioner, tokenizer_for
from vlcap.core.infer.decoding import ban_repeated_ngrams, caption_images, length_normalised
from vlcap.core.plugins import load_registry

MAX_LENGTH = 10
STRATEGIES = {  # strategy -> options that exercise it
    "greedy": {},
    "beam": {"num_beams": 3, "no_repeat_ngram_size": 2, "min_length": 2},
    "top_k": {"k": 20, "seed": 7, "temperature": 1.5},
    "top_p": {"p": 0.8, "seed": 7},
}


def make_captioner(method, registry):
    """A tiny captioner whose every added part is non-zero (zero-init parts would hide a cache
    that skipped them) and whose end token is likely enough that captions end at varying lengths."""
    cfg = tiny_config(method)
    captioner, peft, _ = build_captioner(cfg, registry)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in captioner.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=generator) * 0.3)
        end = tokenizer_for(cfg).eot_id
        captioner.decoder.wte.weight[end] *= 2.2
    return captioner.eval(), peft, tokenizer_for(cfg)


@pytest.fixture(scope="module")
def captioners(registry):
    return {method: make_captioner(method, registry) for method in ("lora", "prefix")}


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(4, 3, 160, 160, generator=torch.Generator().manual_seed(1))


_decoded = {}


def captions(captioners, registry, method, pixels, strategy, options, cached=True):
    """Captions of the module's images (memoised: several tests compare the same runs)."""
    key = (method, strategy, json.dumps(options, sort_keys=True), cached)
    if key not in _decoded:
        captioner, _, tokenizer = captioners[method]
        _decoded[key] = caption_images(captioner, pixels, tokenizer, registry.get("decoding", strategy), options,
                                       MAX_LENGTH, cached=cached)
    return _decoded[key]


def test_list_plugins_shows_the_decoding_strategies():
    result = CliRunner().invoke(main, ["list-plugins", "--json"])
    kinds = {e["name"]: e["kind"] for e in json.loads(result.output)}
    assert all(kinds.get(name) == "decoding" for name in STRATEGIES)


STRATEGY_PLUGIN = """
import vlcap
from vlcap.core.infer.decoding import DecodingStrategy, decode_token_by_token

class LeastLikely(DecodingStrategy):
    name = "least_likely"
    description = "third-party test strategy"

    def generate(self, model, config, *, start_id, end_id, max_length):
        return decode_token_by_token(model, lambda logits: logits.argmin(-1),
                                     start_id=start_id, end_id=end_id, max_length=max_length)

@vlcap.hookimpl
def register_decoding_strategies(register):
    register(LeastLikely())
"""


def test_hook_register_decoding_strategies(site, captioners, pixels):
    install_package(site, "vlcap-least", "vlcap_least", STRATEGY_PLUGIN)
    strategy = load_registry().get("decoding", "least_likely")
    captioner, _, tokenizer = captioners["lora"]
    out = caption_images(captioner, pixels, tokenizer, strategy, {}, 3)
    assert len(out) == 4 and all(out)  # the least likely token is never the end token here


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_cached_decoding_equals_full_recompute_with_every_option(captioners, registry, pixels, strategy):
    # The kit checks each strategy's defaults; these options take the other branches.
    cached = captions(captioners, registry, "prefix", pixels, strategy, STRATEGIES[strategy])
    assert cached == captions(captioners, registry, "prefix", pixels, strategy, STRATEGIES[strategy], cached=False)
    if strategy == "greedy":  # captions end at different steps, so the end-token handling is covered
        assert len({len(c.split()) for c in cached}) > 1


def test_sampling_with_one_candidate_is_greedy_and_seeds_reproduce(captioners, registry, pixels):
    greedy = captions(captioners, registry, "lora", pixels, "greedy", {})
    assert captions(captioners, registry, "lora", pixels, "top_k", {"k": 1}) == greedy
    assert captions(captioners, registry, "lora", pixels, "top_p", {"p": 1e-6}) == greedy
    first = captions(captioners, registry, "lora", pixels, "top_p", {"p": 0.95, "seed": 3, "temperature": 2.0})
    assert first == captions(captioners, registry, "lora", pixels, "top_p", {"p": 0.95, "seed": 3, "temperature": 2.0})
    assert first != captions(captioners, registry, "lora", pixels, "top_p", {"p": 0.95, "seed": 4, "temperature": 2.0})


def test_decoding_runs_under_autocast(captioners, registry, pixels):
    # prefix: its float32 prefix joins bfloat16 activations in the cache
    captioner, _, tokenizer = captioners["prefix"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = caption_images(captioner, pixels[:2], tokenizer, registry.get("decoding", "beam"), {"num_beams": 2}, 4)
    assert len(out) == 2 and all(isinstance(c, str) for c in out)


class MarkovModel:
    """A ``NextToken`` model whose next-token distribution depends on the last token only."""

    def __init__(self, table, images):
        self.table, self.images, self.device = table, images, torch.device("cpu")

    def logits(self, ids):
        return self.table[ids[:, -1]]

    def expand(self, beams):
        pass

    def reorder(self, index):
        pass


def best_by_enumeration(table, start, end, max_length, length_penalty):
    logprobs = torch.log_softmax(table, -1)
    best = (-math.inf, None)
    for length in range(1, max_length + 1):
        for tokens in itertools.product(range(1, table.size(0)), repeat=length):
            path = (start, *tokens)
            score = sum(logprobs[a, b].item() for a, b in zip(path, path[1:]))
            if length < max_length:  # a caption that ends: end token included in the length
                score += logprobs[tokens[-1], end].item()
                best = max(best, (length_normalised(score, length + 1, length_penalty), list(tokens)))
            else:  # cut at max_length without an end token
                best = max(best, (length_normalised(score, length, length_penalty), list(tokens)))
    # the empty caption: the end token straight after the start token
    return max(best, (length_normalised(logprobs[start, end].item(), 1, length_penalty), []))[1]


@pytest.mark.parametrize("seed", range(4))
def test_wide_beam_search_finds_the_best_caption(registry, seed):
    table = torch.randn(4, 4, generator=torch.Generator().manual_seed(seed)) * 2  # token 0 ends
    beam = registry.get("decoding", "beam")
    config = beam.config_class(num_beams=27, length_penalty=0.0)
    found = beam.generate(MarkovModel(table, 1), config, start_id=0, end_id=0, max_length=4)[0]
    assert found == best_by_enumeration(table, 0, 0, 4, 0.0)


def test_beam_search_respects_min_length_and_ngram_ban(registry):
    table = torch.zeros(5, 5)
    table[:, 0] = 5.0  # ending is by far the most likely ...
    table[1, 2] = table[2, 1] = 4.0  # ... then 1 2 1 2 1 2 ...
    beam = registry.get("decoding", "beam")
    config = beam.config_class(num_beams=2, min_length=5, no_repeat_ngram_size=2)
    found = beam.generate(MarkovModel(table, 2), config, start_id=1, end_id=0, max_length=8)
    for tokens in found:
        assert len(tokens) >= 5
        bigrams = list(zip(tokens, tokens[1:]))
        assert len(bigrams) == len(set(bigrams))


def test_ngram_ban_removes_exactly_the_repeating_tokens():
    ids = torch.tensor([[0, 5, 6, 5, 7, 5]])  # after the start token: 5 6 5 7 5; next after "5" ...
    logits = ban_repeated_ngrams(torch.zeros(1, 10), ids, 2)
    assert torch.isinf(logits[0]).nonzero().flatten().tolist() == [6, 7]  # ... "5 6" and "5 7" exist
