"""What every connector shares: the plugin interface and the core's check of what it built.

A connector joins the frozen encoder's tokens to the frozen decoder. It sets
``captioner.projection`` (any module: encoder tokens ``(B, N, encoder width)`` -> image tokens
``(B, M, n_embd)``, trained) and feeds the image tokens to the decoder through one or both of its
slots: cross-attention sub-layers (``gpt2.add_cross_attention``) and the input sequence
(``decoder.image_prefix = ImagePrefix(...)``). A projection that changes the number or layout of
the tokens (pooling) says so in ``captioner.image_tokens``, which attention maps are drawn on.
"""
from dataclasses import dataclass

import torch

from vlcap.core.config import plugin_config
from vlcap.core.errors import VlcapError


class Connector:
    """Base class for connector plugins. Subclasses set the class attributes and implement ``apply``."""

    name = ""
    description = ""
    config_class = None  # a dataclass of the connector's options, all with defaults

    def apply(self, captioner, config):
        """Set ``captioner.projection`` and join the image tokens to ``captioner.decoder``."""
        raise NotImplementedError


@dataclass(frozen=True)
class ImageTokens:
    """The layout of the image tokens the projection gives: ``prefix`` leading tokens (CLS,
    registers), then a ``grid`` ``(rows, cols)`` of patch tokens in raster order."""
    prefix: int
    grid: tuple

    @property
    def count(self):
        return self.prefix + self.grid[0] * self.grid[1]

    @classmethod
    def of(cls, encoder):
        """The encoder's own tokens, one image token each (what a token-wise projection keeps)."""
        return cls(encoder.num_prefix_tokens, tuple(encoder.grid_size))


def apply_connector(captioner, connector, options):
    """Run ``connector`` on ``captioner`` and check what it built. Returns its config."""
    config = plugin_config(connector, options, "connector.options")
    connector.apply(captioner, config)
    check_built_connector(captioner, connector)
    return config


def check_built_connector(captioner, connector):
    """One line for a connector that left the captioner without a projection, joined the image
    tokens to nothing, or whose projection does not give the ``image_tokens`` it declared."""
    where = f"connector '{connector.name}'"
    if not isinstance(captioner.projection, torch.nn.Module):
        raise VlcapError(f"{where} set no captioner.projection (a module: encoder tokens -> image tokens)")
    decoder = captioner.decoder
    if decoder.image_prefix is None and all(block.cross_attn is None for block in decoder.h):
        raise VlcapError(f"{where} joined the image to nothing: add cross-attention to a block or set "
                         "decoder.image_prefix")
    encoder = captioner.encoder
    device = next(encoder.parameters()).device
    with torch.no_grad():
        shape = tuple(captioner.projection(torch.zeros(1, encoder.num_tokens, encoder.embed_dim, device=device)).shape)
    expected = (1, captioner.image_tokens.count, decoder.cfg.n_embd)
    if shape != expected:
        raise VlcapError(f"{where}: its projection gives image tokens of shape {shape[1:]}, but captioner.image_tokens "
                         f"and the decoder width say {expected[1:]}")
