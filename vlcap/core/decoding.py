"""Decoding strategies are plugins; this module is their interface and the one place that
turns images into caption strings with whichever strategy is asked for."""
import torch

from vlcap.core.config import plugin_config


class DecodingStrategy:
    """Base class for decoding plugins. ``generate`` receives the image tokens already encoded
    (``memory``: ``(B, tokens, n_embd)``) and returns one list of token ids per image, without
    the start token and cut before the end token."""

    name = ""
    description = ""
    config_class = None  # dataclass of the strategy's options

    def generate(self, captioner, memory, config, *, start_id, end_id, max_length):
        raise NotImplementedError


@torch.no_grad()
def caption_images(captioner, pixels, tokenizer, strategy, options=None, max_length=30):
    """Captions (strings) for a batch of preprocessed images."""
    config = plugin_config(strategy, options, "decoding.options")
    memory = captioner.encode(pixels)
    token_lists = strategy.generate(captioner, memory, config, start_id=tokenizer.eot_id,
                                    end_id=tokenizer.eot_id, max_length=max_length)
    return [tokenizer.decode(tokens).strip() for tokens in token_lists]
