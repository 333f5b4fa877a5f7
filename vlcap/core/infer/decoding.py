"""Decoding strategies are plugins; this module is their interface, the mechanics they share,
and the one place that turns images into caption strings with whichever strategy is asked for.

A strategy never calls the decoder directly. It gets a ``NextToken`` model: ``logits(ids)``
gives the next-token logits of every row, and ``expand``/``reorder`` change the rows (beams).
The cached implementation feeds only new tokens through a ``DecoderCache``; the recompute one
runs the full sequence every step (the reference the cache is tested and benchmarked against).
Both compute the same thing, so every strategy works with either, unchanged.
"""
import torch

from vlcap.core.config import plugin_config
from vlcap.core.model.kv_cache import DecoderCache
from vlcap.core.plugins import plugin_call
from vlcap.core.runtime import evaluating


class DecodingStrategy:
    """Base class for decoding plugins. ``generate`` receives the decoder as a ``NextToken``
    model with one row per image and returns one list of token ids per image, without the
    start token and cut before the end token."""

    name = ""
    description = ""
    config_class = None  # dataclass of the strategy's options

    def generate(self, model, config, *, start_id, end_id, max_length):
        raise NotImplementedError


class CachedNextToken:
    """Incremental decoding: each call feeds only the tokens the cache has not seen."""

    def __init__(self, decoder, memory):
        self.decoder = decoder
        self.cache = DecoderCache.build(decoder, memory)
        self.images = memory.size(0)
        self.device = memory.device

    def logits(self, ids):
        return self.decoder(ids[:, self.cache.length:], cache=self.cache)[:, -1]

    def expand(self, beams):
        self.cache.expand(beams)

    def reorder(self, index):
        self.cache.reorder(index)


class RecomputeNextToken:
    """Naive decoding: the whole sequence through the decoder at every step, with the image
    tokens copied for every beam."""

    def __init__(self, decoder, memory):
        self.decoder = decoder
        self.memory = memory
        self.images = memory.size(0)
        self.device = memory.device

    def logits(self, ids):
        return self.decoder(ids, self.memory)[:, -1]

    def expand(self, beams):
        self.memory = self.memory.repeat_interleave(beams, dim=0)

    def reorder(self, index):
        self.memory = self.memory.index_select(0, index)


def next_token_model(decoder, memory, cached=True):
    return (CachedNextToken if cached else RecomputeNextToken)(decoder, memory)


# --- mechanics shared by strategies -------------------------------------------------------

def cut_at_end(tokens, end_id):
    """Token ids up to (not including) the first end token."""
    return tokens[:tokens.index(end_id)] if end_id in tokens else tokens


def ban_repeated_ngrams(logits, ids, n, start=1):
    """Set to -inf every token that would repeat an n-gram already in its row of ``ids``
    (positions from ``start`` on, i.e. after the start token). Changes ``logits`` in place."""
    if n <= 0 or ids.size(1) - start < n:
        return logits
    for row, tokens in enumerate(ids[:, start:].tolist()):
        context = tuple(tokens[len(tokens) - n + 1:]) if n > 1 else ()
        banned = [tokens[i + n - 1] for i in range(len(tokens) - n + 1) if tuple(tokens[i:i + n - 1]) == context]
        if banned:
            logits[row, banned] = float("-inf")
    return logits


def length_normalised(score, length, length_penalty):
    """Beam-search ranking of a finished caption: summed log-probability / length ** penalty
    (``length`` counts the generated tokens, end token included; 0 ranks by raw probability,
    larger values favour longer captions)."""
    return score / length ** length_penalty


def sample(logits, temperature=1.0, generator=None):
    """One token per row drawn from ``softmax(logits / temperature)`` (-inf logits never drawn)."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def make_generator(seed, device):
    """A seeded generator, or None (torch's global random state) when ``seed`` is None."""
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def decode_token_by_token(model, choose, *, start_id, end_id, max_length):
    """The loop of every one-candidate-per-image strategy (greedy, sampling): ``choose(logits)``
    picks each row's next token; finished rows only append end tokens; stops when all ended."""
    ids = torch.full((model.images, 1), start_id, dtype=torch.long, device=model.device)
    finished = torch.zeros(model.images, dtype=torch.bool, device=model.device)
    for _ in range(max_length):
        next_ids = choose(model.logits(ids)).masked_fill(finished, end_id)
        ids = torch.cat([ids, next_ids[:, None]], dim=1)
        finished |= next_ids == end_id
        if finished.all():
            break
    return [cut_at_end(row[1:].tolist(), end_id) for row in ids]


def generate_tokens(captioner, pixels, tokenizer, strategy, options=None, max_length=30, cached=True):
    """Token ids per image (no start token, cut before the end token) for a batch of preprocessed
    images. ``cached=False`` recomputes the whole sequence every step (for tests and benchmarks;
    same tokens, much slower)."""
    config = plugin_config(strategy, options, "decoding.options")
    with evaluating(captioner), torch.inference_mode():
        memory = captioner.encode(pixels)
        model = next_token_model(captioner.decoder, memory, cached)
        with plugin_call(strategy, "generate"):
            return strategy.generate(model, config, start_id=tokenizer.eot_id,
                                     end_id=tokenizer.eot_id, max_length=max_length)


def caption_images(captioner, pixels, tokenizer, strategy, options=None, max_length=30, cached=True):
    """Captions (strings) for a batch of preprocessed images (see ``generate_tokens``)."""
    token_lists = generate_tokens(captioner, pixels, tokenizer, strategy, options, max_length, cached)
    return [tokenizer.decode(tokens).strip() for tokens in token_lists]
