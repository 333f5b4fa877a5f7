"""The public API for plugin authors: everything a plugin and its tests may import from vlcap.

A plugin package imports from here (and ``vlcap.hookimpl``) only; every other vlcap module is
private and may change between releases. vlcap's own plugins follow the same rule (an
import-linter contract in setup.cfg, run by the test suite, enforces it). docs/plugins.md says
what each name is for, with examples.

Connectors: subclass ``Connector``; set ``captioner.projection`` and join the image tokens to the
decoder with ``add_cross_attention`` (per block) and/or ``decoder.image_prefix = ImagePrefix(...)``;
a projection that pools declares its tokens in ``captioner.image_tokens`` (``ImageTokens``).

PEFT methods: subclass ``PeftMethod``; change the captioner through its hook points with
``swap_linear`` (replace a Linear, keeping its pretrained Parameters) and ``select_layers``
(the ``layers`` option); ``project_image_tokens`` before hooking or wrapping a cross-attention's
``k``/``v``; ``pretrained_to_train`` declares pretrained parameters it trains (``is_pretrained``
tells them); ``trainable_state`` is what ``export`` saves by default; ``keep_frozen`` keeps a random
base a method adapts frozen.

Decoding strategies: subclass ``DecodingStrategy``; ``generate`` gets a ``NextToken`` model
(``NextToken`` documents it: ``logits(ids, hidden=False)``, ``expand``, ``reorder``). The loop
and mechanics every strategy shares: ``decode_token_by_token``, ``sample``, ``make_generator``,
``ban_repeated_ngrams``, ``length_normalised``, ``cut_at_end``.

Metrics: subclass ``Metric``; ``score`` returns ``MetricScores``. The course's scorers are here
to build on (``cider``, ``clip_scores``, ``load_clip``, ``check_java``).

Commands: the ``register_commands(cli)`` hook gets a click group (nothing to import here).

Tests: the conformance kit (``check_peft_method``, ``check_decoding_strategy``, ``check_metric``,
``PEFT_CHECKS``, ``DECODING_CHECKS``, ``METRIC_CHECKS``, ``InterfaceOnlyNextToken``; they need
pytest and are imported on first use) and its tiny builders (``tiny_config``, ``tiny_captioner``,
``pixels_for``, ``token_ids``, ``perturb_trainable``, ``make_synthetic_set``).
"""
from vlcap.apps.synthetic import make_synthetic_set
from vlcap.core.errors import VlcapError, VlcapWarning
from vlcap.core.eval.clip import CLIP_MODEL_ENV, Clip, load_clip
from vlcap.core.eval.evaluation import check_java, cider, clip_scores
from vlcap.core.eval.metrics import Metric, MetricScores
from vlcap.core.hookspecs import hookimpl
from vlcap.core.infer.decoding import (DecodingStrategy, NextToken, ban_repeated_ngrams, cut_at_end,
                                       decode_token_by_token, generate_tokens, length_normalised, make_generator,
                                       sample)
from vlcap.core.model.connector import Connector, ImageTokens
from vlcap.core.model.gpt2 import ImagePrefix, add_cross_attention, merge_heads, split_heads
from vlcap.core.model.peft import (PeftMethod, is_pretrained, keep_frozen, project_image_tokens, select_layers,
                                   swap_linear, trainable_state)
from vlcap.core.model.tokenizer import IGNORE_INDEX, Tokenizer
from vlcap.core.plugins import registry
from vlcap.core.validation import Ge, Gt, Interval, Le, Lt
from vlcap.testing.builders import perturb_trainable, pixels_for, tiny_captioner, tiny_config, token_ids

_KIT = ("check_peft_method", "check_decoding_strategy", "check_metric", "check_connector", "PEFT_CHECKS",
        "DECODING_CHECKS", "METRIC_CHECKS", "CONNECTOR_CHECKS", "InterfaceOnlyNextToken")

__all__ = [
    # hooks and errors
    "hookimpl", "registry", "VlcapError", "VlcapWarning",
    # connectors
    "Connector", "ImagePrefix", "ImageTokens", "add_cross_attention",
    # option ranges: typing.Annotated[int, Ge(1)] in a config_class (checked where options enter)
    "Ge", "Gt", "Le", "Lt", "Interval",
    # PEFT methods
    "PeftMethod", "swap_linear", "project_image_tokens", "select_layers", "trainable_state", "is_pretrained",
    "keep_frozen", "split_heads", "merge_heads",
    # decoding strategies
    "DecodingStrategy", "NextToken", "decode_token_by_token", "sample", "make_generator", "ban_repeated_ngrams",
    "length_normalised", "cut_at_end", "generate_tokens",
    # metrics
    "Metric", "MetricScores", "cider", "clip_scores", "load_clip", "check_java", "Clip", "CLIP_MODEL_ENV",
    # tokens
    "Tokenizer", "IGNORE_INDEX",
    # tests
    "tiny_config", "tiny_captioner", "pixels_for", "token_ids", "perturb_trainable", "make_synthetic_set", *_KIT,
]


def __getattr__(name):
    # The kit's checks use pytest, which a plugin at run time does not need: imported on first use.
    if name in _KIT:
        import vlcap.testing
        if name == "InterfaceOnlyNextToken":
            from vlcap.testing.proxy import InterfaceOnlyNextToken
            return InterfaceOnlyNextToken
        return getattr(vlcap.testing, name)
    raise AttributeError(f"module 'vlcap.api' has no attribute {name!r}")
