"""Tiny models and inputs for plugin tests: what the conformance kit builds, for a plugin's own
tests too (re-exported by ``vlcap.api``). Everything is the ``tiny`` preset: timm's test ViT and
a random 2-layer GPT-2, offline, built in well under a second. Nothing here imports pytest."""
import functools
import json

import torch

from vlcap.core import config as config_lib
from vlcap.core.infer.decoding import generate_tokens
from vlcap.core.model.captioner import build_captioner, tokenizer_for
from vlcap.core.model.peft import seeded
from vlcap.core.plugins import registry as installed_registry


IMAGES = 3
MAX_LENGTH = 8
FULL_SIZE_ENCODER = "vit_large_patch14_clip_224.openai"  # the largest encoder the course uses


def tiny_config(method="lora", **sections):
    """The ``tiny`` preset's run config with PEFT method ``method``; ``sections`` override config
    sections, e.g. ``tiny_config("lora", train={"max_steps": 2})``."""
    return config_lib.resolve("tiny", overrides=[{"peft": {"method": method}}, sections])


def tiny_captioner(method, registry=None, connector=None, **options):
    """``(captioner, tokenizer)``: the tiny preset with ``method`` applied with ``options`` (its
    ``peft.options``), random weights; ``registry`` defaults to the installed plugins, ``connector``
    (a name) to the default one."""
    cfg = tiny_config(method, peft={"method": method, "options": options},
                      **({"connector": {"name": connector}} if connector else {}))
    captioner = build_captioner(cfg, registry or installed_registry()).captioner
    return captioner, tokenizer_for(cfg)


def pixels_for(captioner, images=IMAGES, seed=1):
    """A seeded batch of random preprocessed images of the size ``captioner``'s encoder takes."""
    size = tuple(captioner.encoder.vit.patch_embed.img_size)
    return torch.randn(images, 3, *size, generator=torch.Generator().manual_seed(seed))


def token_ids(rows, length, vocab_size, seed=2):
    """A seeded ``(rows, length)`` batch of token ids below ``vocab_size``."""
    return torch.randint(0, vocab_size, (rows, length), generator=torch.Generator().manual_seed(seed))


def perturb_trainable(captioner, std=0.3, seed=0):
    """Give every trainable parameter a trained-looking value: a zero-initialised part (LoRA's B,
    the cross-attention output) would otherwise hide a part that merging or a cache got wrong."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in captioner.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=generator).to(p) * std)
    return captioner


def plugin_config_for(method, options=None, connector=None):
    """The tiny preset with PEFT method ``method`` and its ``options``, under connector
    ``connector`` (a name; default: the preset's) -- the kit's checks' config."""
    return tiny_config(method, peft={"method": method, "options": dict(options or {})},
                       **({"connector": {"name": connector}} if connector else {}))


def connector_config(method, connector):
    """The tiny preset with PEFT method ``method`` (its default options) and connector ``connector``."""
    return plugin_config_for(method, None, connector)


def decoding_captioner(method, registry, options=None, connector=None):
    """A perturbed tiny captioner (shared by the decoding checks, which never change it) whose end
    token is likely enough that captions end at varying lengths: PEFT method ``method`` with
    ``options`` under connector ``connector`` (a name; default: the preset's)."""
    return _decoding_captioner(method, registry, json.dumps(options or {}, sort_keys=True), connector)


@functools.lru_cache(maxsize=None)
def _decoding_captioner(method, registry, options, connector):
    cfg = plugin_config_for(method, json.loads(options), connector)
    captioner = build_captioner(cfg, registry).captioner
    perturb_trainable(captioner)
    tokenizer = tokenizer_for(cfg)
    with torch.no_grad():
        captioner.decoder.wte.weight[tokenizer.eot_id] *= 2.2
    return captioner.eval(), tokenizer


def generate(captioner, tokenizer, strategy, options, cached, images=IMAGES, wrap=None):
    """Token lists from ``strategy`` (seeded, so sampling strategies repeat); ``wrap``: a callable
    that wraps the ``NextToken`` model the strategy gets."""
    with seeded(0):
        return generate_tokens(captioner, pixels_for(captioner, images), tokenizer, strategy, options,
                               MAX_LENGTH, cached, wrap=wrap)
