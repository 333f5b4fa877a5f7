"""The captioner: frozen ViT -> a connector (trainable projection, joined to the decoder by
cross-attention or as input tokens) -> frozen GPT-2 with a PEFT method."""
import contextlib
import dataclasses
from typing import NamedTuple

import torch
from torch import nn

from vlcap.core.model.encoder import ImageEncoder
from vlcap.core.errors import VlcapError
from vlcap.core.model.course_weights import check_course_state, load_course_weights, read_course_state
from vlcap.core.model.connector import ImageTokens, apply_connector
from vlcap.core.model.gpt2 import GPT2Decoder
from vlcap.core.model.peft import apply_peft, config_dict, mark_pretrained, seeded
from vlcap.core.model.tokenizer import Tokenizer


class Captioner(nn.Module):
    def __init__(self, encoder: ImageEncoder, decoder: GPT2Decoder):
        super().__init__()
        self.encoder = encoder
        self.projection = None  # the connector's: encoder tokens -> image tokens in decoder width
        self.image_tokens = ImageTokens.of(encoder)  # what the projection gives (a connector may pool)
        self.decoder = decoder
        self.peft = nn.ModuleDict()  # modules a PEFT method owns outright
        mark_pretrained(encoder.parameters())
        mark_pretrained(decoder.pretrained_parameters())

    def encoder_features(self, pixels):
        """The frozen ViT's output tokens ``(B, tokens, embed_dim)``, what a feature cache stores."""
        with torch.no_grad():
            return self.encoder(pixels)

    def encode(self, pixels):
        """Image tokens in decoder width, ``(B, tokens, n_embd)``; the ViT runs without autograd."""
        return self.projection(self.encoder_features(pixels))

    def forward(self, pixels, input_ids):
        return self.decoder(input_ids, self.encode(pixels))

    def loss(self, pixels, input_ids, labels):
        return self.loss_from_features(self.encoder_features(pixels), input_ids, labels)

    def loss_from_features(self, features, input_ids, labels):
        """The training loss from precomputed ViT tokens (a feature cache): the ViT never runs."""
        return self.decoder.next_token_loss(input_ids, labels, self.projection(features))


class CaptionLoss(nn.Module):
    """The training step's forward as one module, so DistributedDataParallel (which syncs the
    gradients of whatever runs through its own forward) can wrap it. ``inputs`` are pixels, or
    ViT tokens when training from a feature cache."""

    def __init__(self, captioner, from_features=False):
        super().__init__()
        self.captioner = captioner
        self.from_features = from_features

    def forward(self, inputs, input_ids, labels):
        if self.from_features:
            return self.captioner.loss_from_features(inputs, input_ids, labels)
        return self.captioner.loss(inputs, input_ids, labels)


class BuiltCaptioner(NamedTuple):
    captioner: Captioner
    method: object  # the PEFT plugin applied
    config: object  # the RunConfig it was built from, with the plugins' options resolved (defaults filled in)


def build_captioner(cfg, registry, decoder_weights=None, meta=False):
    """Build the captioner ``cfg`` describes, load decoder weights, apply its connector, then
    its PEFT method (which may change what the connector added).

    ``meta=True`` builds shapes only (no weights, no download): enough to count parameters of a
    full-size model in a second. ``cfg`` is never changed: the plugins' resolved options come back
    in the returned ``config``, which is what a run records.
    """
    state = None
    if decoder_weights is not None and not meta:  # checked before the encoder, which may download
        state = read_course_state(decoder_weights)
        check_course_state(state, cfg.model.decoder, decoder_weights)
    device = torch.device("meta") if meta else contextlib.nullcontext()
    with seeded(cfg.model.init_seed), device:
        encoder = build_encoder(cfg, meta)
        decoder = GPT2Decoder(cfg.model.decoder)
        captioner = Captioner(encoder, decoder)
    if state is not None:
        load_course_weights(decoder, decoder_weights, state)
    connector = registry.get("connector", cfg.connector.name)
    method = registry.get("peft", cfg.peft.method)
    with seeded(cfg.model.init_seed + 2), device:
        connector_config = apply_connector(captioner, connector, cfg.connector.options)
    with seeded(cfg.model.init_seed + 1), device:
        peft_config = apply_peft(captioner, method, cfg.peft.options)
    resolved = dataclasses.replace(
        cfg, connector=dataclasses.replace(cfg.connector, options=config_dict(connector_config)),
        peft=dataclasses.replace(cfg.peft, options=config_dict(peft_config)))
    return BuiltCaptioner(captioner, method, resolved)


def prefill_length(captioner):
    """Positions the decoder puts before the text: a prompt (``input_prefix``) and, when the
    connector places them in the sequence, the image tokens."""
    decoder = captioner.decoder
    length = 0 if decoder.input_prefix is None else decoder.input_prefix(1).size(1)
    return length + (captioner.image_tokens.count if decoder.image_prefix is not None else 0)


def check_context(captioner, setting, value, extra=0):
    """One line, before any work, when ``value + extra`` text positions (``setting=value`` asks
    for them) do not fit the decoder's context after what comes before the text."""
    before, context = prefill_length(captioner), captioner.decoder.cfg.block_size
    over = before + value + extra - context
    if over > 0:
        fix = f"lower {setting} to at most {value - over}, or " if value - over > 0 else ""
        raise VlcapError(f"{setting}={value}: {before} positions before the text (image tokens, prompt) + "
                         f"{value + extra} text positions exceed the decoder context of {context} "
                         f"(model.decoder.block_size); {fix}use fewer image tokens (a connector option)")


def build_encoder(cfg, meta=False):
    """The frozen encoder ``cfg`` names. Call it first thing under ``seeded(cfg.model.init_seed)``
    (as ``build_captioner`` does) so a non-pretrained encoder comes out the same wherever it is
    built: the feature cache relies on that."""
    return ImageEncoder(cfg.model.encoder, pretrained=cfg.model.encoder_pretrained and not meta)


def tokenizer_for(cfg):
    """The tokenizer ``cfg`` names, checked against the decoder's vocabulary size."""
    tokenizer = Tokenizer(cfg.model.encoder_json, cfg.model.vocab_bpe)
    if tokenizer.vocab_size != cfg.model.decoder.vocab_size:
        raise VlcapError(f"{tokenizer.encoder_json}: tokenizer has {tokenizer.vocab_size} tokens but the "
                         f"decoder expects {cfg.model.decoder.vocab_size}; use GPT-2's encoder.json/vocab.bpe")
    return tokenizer
