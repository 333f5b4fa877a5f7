"""The checks of the conformance kit (see ``vlcap.testing``). Every PEFT and decoding check takes
the plugin's name, the registry, the plugin's options (its ``config_class`` fields; ``{}``: the
defaults) and the connector (a name) to run under: ``check_peft_method`` and
``check_decoding_strategy`` run each check under every installed connector."""
import hashlib
import json
import tempfile
from collections import Counter

import pytest
import torch

from vlcap.core import config as config_lib
from vlcap.core.errors import VlcapError
from vlcap.core.infer.decoding import next_token_model
from vlcap.core.model.captioner import build_captioner, tokenizer_for
from vlcap.core.model.checkpoint import load_checkpoint, save_checkpoint
from vlcap.core.model.peft import PeftMethod, check_budget, count_parameters, is_pretrained, merge_peft
from vlcap.core.plugins import PluginEntry, Registry, registry as installed_registry
from vlcap.core.train.trainer import prepare_model
from vlcap.testing.builders import (FULL_SIZE_ENCODER, IMAGES, MAX_LENGTH, decoding_captioner, generate,
                                    perturb_trainable, pixels_for, plugin_config_for, token_ids)
from vlcap.testing.proxy import InterfaceOnlyNextToken
from vlcap.testing.metric_checks import METRIC_CHECKS

# --- PEFT method checks -----------------------------------------------------------------

def build(name, registry, options, connector=None):
    """The tiny preset with PEFT method ``name`` applied with ``options`` under connector
    ``connector`` (a name; default: the preset's): ``(captioner, cfg)``."""
    cfg = plugin_config_for(name, options, connector)
    return build_captioner(cfg, registry).captioner, cfg


def check_gradients(name, registry, options, connector):
    """Only the method's and the core's new parameters, and the pretrained ones it declares in
    ``pretrained_to_train``, train; every other pretrained one stays frozen and gets no gradient;
    every trainable tensor gets a non-zero gradient from the loss. The trainable parameters are
    perturbed first: at a zero init (LoRA's B, the cross-attention output) the parameters behind
    it get exactly zero gradient, which would hide a tensor that is not wired in."""
    captioner, _ = build(name, registry, options, connector)
    perturb_trainable(captioner, std=0.05)
    pixels = pixels_for(captioner, 2)
    ids = token_ids(2, 7, captioner.decoder.cfg.vocab_size)
    captioner.loss(pixels, ids, ids).backward()
    declared = 0
    for pname, p in captioner.named_parameters():
        if is_pretrained(p) and not p.requires_grad:
            assert p.grad is None, f"frozen pretrained parameter {pname} got a gradient"
            continue
        declared += p.numel() if is_pretrained(p) else 0
        assert p.grad is not None, f"{pname} is trainable but does not reach the loss"
        assert p.grad.abs().sum() > 0, f"{pname} is trainable but its gradient is zero"
    counts = count_parameters(captioner)
    assert counts.groups["encoder"][0] == 0 and counts.groups["decoder"][0] == declared
    check_adds_parameters(name, registry, counts)


def check_adds_parameters(name, registry, counts):
    """A method adds trainable parameters or declares pretrained ones to train (the decoder's
    trainable count), unless it claims ``adds_parameters = False``: then it adds none."""
    added, declared = counts.groups.get("peft", (0, 0))[0], counts.groups.get("decoder", (0, 0))[0]
    if registry.get("peft", name).adds_parameters:
        assert added + declared > 0, \
            f"PEFT method '{name}' added no trainable parameter and declared no pretrained one to train"
    else:
        assert added == 0, f"PEFT method '{name}' claims adds_parameters=False but added {added:,}"


def value_digests(params):
    return Counter(hashlib.sha1(p.detach().float().cpu().numpy().tobytes() + str(tuple(p.shape)).encode()).hexdigest()
                   for p in params)


def check_pretrained_kept(name, registry, options, connector):
    """``apply`` keeps every pretrained Parameter object (the core refuses a method that replaced
    one, e.g. ``lin.bias = nn.Parameter(lin.bias.clone())``) and leaves the values of all it does
    not declare in ``pretrained_to_train`` as loaded."""
    try:
        captioner, cfg = build(name, registry, options, connector)
    except VlcapError as exc:
        pytest.fail(f"PEFT method '{name}' could not be applied: {exc}")
    # The same config, seeds and pretrained values, with a method that changes nothing.
    base_registry = Registry([PluginEntry(name, "peft", "kit", "0", "", _NoMethod()), *registry.entries("connector")])
    base = build_captioner(plugin_config_for(name, None, connector), base_registry).captioner
    loaded = value_digests(p for p in base.parameters() if is_pretrained(p))
    kept = value_digests(p for p in captioner.parameters() if is_pretrained(p) and not p.requires_grad)
    changed = kept - loaded
    assert not changed, f"PEFT method '{name}' changed the values of {sum(changed.values())} pretrained " \
                        "parameter(s) it does not train (declare them in pretrained_to_train, or leave them)"


def check_save_load(name, registry, options, connector):
    """A saved checkpoint loads into a captioner with exactly the same logits."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = plugin_config_for(name, options, connector)
        tokenizer, captioner, method, cfg = prepare_model(cfg, registry, tmp)
        perturb_trainable(captioner, std=0.05).eval()
        path = f"{tmp}/checkpoint.safetensors"
        saved = save_checkpoint(path, captioner, method, cfg, tokenizer, registry)
        assert 0 < saved <= count_parameters(captioner).trainable
        loaded = load_checkpoint(path, registry)
        pixels, ids = pixels_for(captioner, 2), token_ids(2, 7, cfg.model.decoder.vocab_size)
        with torch.no_grad():
            assert torch.equal(loaded.captioner(pixels, ids), captioner(pixels, ids)), \
                f"'{name}': logits of the loaded checkpoint differ from the saved model's"


def check_merge(name, registry, options, connector):
    """Where the method claims ``can_merge``, merged logits and captions equal unmerged ones."""
    method = registry.get("peft", name)
    if not method.can_merge:
        pytest.skip(f"PEFT method '{name}' does not claim can_merge")
    captioner, cfg = build(name, registry, options, connector)
    perturb_trainable(captioner, std=0.05).eval()
    tokenizer = tokenizer_for(cfg)
    pixels, ids = pixels_for(captioner, 2), token_ids(2, 7, cfg.model.decoder.vocab_size)
    greedy = registry.get("decoding", "greedy")
    with torch.no_grad():
        before = [p.clone() for p in captioner.parameters() if is_pretrained(p)]
        unmerged = captioner(pixels, ids)
        captions = generate(captioner, tokenizer, greedy, {}, cached=True, images=2)
        merge_peft(captioner, method)
        after = [p for p in captioner.parameters() if is_pretrained(p)]
        assert any(not torch.equal(a, p) for a, p in zip(before, after)), \
            f"'{name}'.merge left every pretrained weight unchanged"
        torch.testing.assert_close(captioner(pixels, ids), unmerged, rtol=1e-4, atol=1e-4)
    assert generate(captioner, tokenizer, greedy, {}, cached=True, images=2) == captions


def check_beam1_is_greedy(name, registry, options, connector):
    """Beam search with one beam is greedy decoding."""
    captioner, tokenizer = decoding_captioner(name, registry, options, connector)
    greedy = generate(captioner, tokenizer, registry.get("decoding", "greedy"), {}, cached=True)
    assert generate(captioner, tokenizer, registry.get("decoding", "beam"), {"num_beams": 1}, cached=True) == greedy


def check_cached_decoding(name, registry, options, connector):
    """The decoding cache equals full recompute: next-token logits and final hidden states
    through expand and reorder, and the captions of greedy and 3-beam search."""
    captioner, tokenizer = decoding_captioner(name, registry, options, connector)
    decoder = captioner.decoder
    ids = token_ids(IMAGES * 2, 6, decoder.cfg.vocab_size)
    with torch.inference_mode():
        memory = captioner.encode(pixels_for(captioner))
        cached, full = next_token_model(decoder, memory, True), next_token_model(decoder, memory, False)
        for model in (cached, full):
            model.logits(ids[::2, :2])  # one row per image, then two beams each
            model.expand(2)
        swap = torch.tensor([1, 0, 3, 3, 5, 4])  # beams move within their own image only
        for model in (cached, full):
            model.reorder(swap)
        rows = ids[::2, :2].repeat_interleave(2, 0)[swap]
        for t in range(2, ids.size(1)):
            rows = torch.cat([rows, ids[:, t:t + 1]], 1)
            (cached_logits, cached_states), (full_logits, full_states) = (cached.logits(rows, hidden=True),
                                                                          full.logits(rows, hidden=True))
            # float32 sums in another order: logits of magnitude ~10 agree to ~1e-4 of that scale
            torch.testing.assert_close(cached_logits, full_logits, rtol=1e-4, atol=1e-3)
            torch.testing.assert_close(cached_states, full_states, rtol=1e-4, atol=1e-4)
            assert cached_states.shape == (rows.size(0), decoder.cfg.n_embd)
    for strategy, strategy_options in (("greedy", {}), ("beam", {"num_beams": 3})):
        strategy = registry.get("decoding", strategy)
        assert generate(captioner, tokenizer, strategy, strategy_options, cached=True) == \
            generate(captioner, tokenizer, strategy, strategy_options, cached=False), f"cached {strategy.name} differs"


def check_budget_at_full_size(name, registry, options, connector):
    """With the options given (default: its defaults), under the connector, on GPT-2 small and the
    largest course encoder, the model stays within the 35M trainable-parameter budget (built as
    shapes only, like ``train --dry-run``: ``apply`` runs on the meta device)."""
    cfg = config_lib.resolve("full", overrides=[{"peft": {"method": name, "options": dict(options)},
                                                 "model": {"encoder": FULL_SIZE_ENCODER}},
                                                {"connector": {"name": connector}} if connector else {}])
    captioner = build_captioner(cfg, registry, meta=True).captioner
    counts = count_parameters(captioner)
    check_adds_parameters(name, registry, counts)
    check_budget(counts.trainable, what=f"'{name}' with options {options or 'default'}"
                                        f"{f' under connector {connector!r}' if connector else ''} at full size")


class _NoMethod(PeftMethod):
    name = "kit-none"

    def apply(self, captioner, config):
        pass


def check_zero_init(name, registry, options, connector):
    """Where the method claims ``zero_init``, a freshly applied method leaves the output unchanged."""
    if not registry.get("peft", name).zero_init:
        pytest.skip(f"PEFT method '{name}' does not claim zero_init")
    base_registry = Registry([PluginEntry("kit-none", "peft", "kit", "0", "", _NoMethod()),
                              *registry.entries("connector")])
    base = build_captioner(plugin_config_for("kit-none", None, connector), base_registry).captioner
    captioner, _ = build(name, registry, options, connector)
    with torch.no_grad():
        # Let the image matter (a cross-attention output starts at zero), the same in both.
        perturb_trainable(base, std=0.05)
        captioner.load_state_dict(base.state_dict(), strict=False)
        pixels, ids = pixels_for(base, 2), token_ids(2, 7, base.decoder.cfg.vocab_size)
        torch.testing.assert_close(captioner.eval()(pixels, ids), base.eval()(pixels, ids))


PEFT_CHECKS = {
    "gradients": check_gradients,
    "pretrained_kept": check_pretrained_kept,
    "save_load": check_save_load,
    "merge": check_merge,
    "beam1_is_greedy": check_beam1_is_greedy,
    "cached_decoding": check_cached_decoding,
    "budget": check_budget_at_full_size,
    "zero_init": check_zero_init,
}


# --- decoding strategy checks ------------------------------------------------------------

DECODING_METHOD = "prefix"  # its prefix keys/values sit in the cache, the hardest case for one


def check_valid_output(name, registry, options, connector):
    """With the options given, the strategy returns, per image, a list of token ids of the
    vocabulary, at most ``max_length`` long, without the end token."""
    captioner, tokenizer = decoding_captioner(DECODING_METHOD, registry, connector=connector)
    out = generate(captioner, tokenizer, registry.get("decoding", name), options, cached=True)
    assert isinstance(out, list) and len(out) == IMAGES, f"'{name}' must return one token list per image"
    for tokens in out:
        assert isinstance(tokens, list) and len(tokens) <= MAX_LENGTH
        assert all(isinstance(t, int) and 0 <= t < tokenizer.vocab_size for t in tokens)
        assert tokenizer.eot_id not in tokens


def check_strategy_cached_equals_recompute(name, registry, options, connector):
    """The strategy gives the same captions through the cache as with full recompute."""
    captioner, tokenizer = decoding_captioner(DECODING_METHOD, registry, connector=connector)
    strategy = registry.get("decoding", name)
    assert generate(captioner, tokenizer, strategy, options, cached=True) == \
        generate(captioner, tokenizer, strategy, options, cached=False)


def check_documented_interface_only(name, registry, options, connector):
    """The strategy uses nothing of the model but the documented ``NextToken`` interface
    (``logits(ids, hidden=...)``, ``expand``, ``reorder``, ``images``, ``device``), used as
    documented: it runs against a proxy that exposes only that, checks every call, and gives the
    same captions as the real model."""
    captioner, tokenizer = decoding_captioner(DECODING_METHOD, registry, connector=connector)
    strategy = registry.get("decoding", name)
    expected = generate(captioner, tokenizer, strategy, options, cached=True)
    proxy = generate(captioner, tokenizer, strategy, options, cached=True, wrap=InterfaceOnlyNextToken)
    assert proxy == expected, f"'{name}' gives other captions through the documented interface alone"


DECODING_CHECKS = {
    "valid_output": check_valid_output,
    "cached_equals_recompute": check_strategy_cached_equals_recompute,
    "documented_interface": check_documented_interface_only,
}


# A connector's checks: the PEFT checks that concern it, with no PEFT method ("none", vlcap's
# own, with its default options), so only the connector trains. Every PEFT method and decoding
# strategy is checked under every connector above.
CONNECTOR_METHOD = "none"
CONNECTOR_CHECKS = {check: PEFT_CHECKS[check]
                    for check in ("gradients", "save_load", "beam1_is_greedy", "cached_decoding", "budget")}


_passed = set()


def _run(checks, kind, name, check, registry, options=None, connector=None):
    """Run ``check`` for plugin ``name`` with ``options`` (None: the configured ones) under
    ``connector`` (None: every installed one; PEFT and decoding checks only)."""
    if check not in checks:
        raise ValueError(f"unknown check '{check}'; the kit has {', '.join(checks)}")
    options = {} if kind == "connector" else dict(configured_options(name) if options is None else options)
    registry = registry or installed_registry()
    registry.get(kind, name)  # an unknown name fails here, listing the installed ones
    if kind == "metric":
        connectors = [None]  # a metric scores captions: no model, no connector
    elif connector is not None:
        registry.get("connector", connector)
        connectors = [connector]
    else:  # a registry without connectors still runs the check (under the preset's default)
        connectors = registry.names("connector") or [None]
    for each in connectors:
        key = (kind, name, check, each, id(registry), json.dumps(options, sort_keys=True, default=repr))
        if key in _passed:  # the same plugin code, the same check: once per process is enough
            continue
        if kind == "connector":
            checks[check](CONNECTOR_METHOD, registry, options, name)
        elif kind == "metric":
            checks[check](name, registry, options)
        else:
            checks[check](name, registry, options, each)
        _passed.add(key)


# Options per plugin name for checks called without ``options``: what ``pytest --vlcap-plugin-option``
# sets (vlcap.testing.pytest_plugin).
CONFIGURED_OPTIONS = {}


def configured_options(name):
    return CONFIGURED_OPTIONS.get(name, {})


def check_peft_method(name, check, registry=None, options=None, connector=None):
    """Run one kit check (a key of ``PEFT_CHECKS``) against the installed PEFT method ``name``
    with ``options`` (default: those given by ``--vlcap-plugin-option``, else its defaults), under
    ``connector`` (a name; default: under every installed connector)."""
    _run(PEFT_CHECKS, "peft", name, check, registry, options, connector)


def check_decoding_strategy(name, check, registry=None, options=None, connector=None):
    """Run one kit check (a key of ``DECODING_CHECKS``) against the installed strategy ``name``
    with ``options``, under ``connector`` (a name; default: under every installed connector)."""
    _run(DECODING_CHECKS, "decoding", name, check, registry, options, connector)


def check_connector(name, check, registry=None):
    """Run one kit check (a key of ``CONNECTOR_CHECKS``) against the installed connector ``name``,
    with no PEFT method, so only the connector trains."""
    _run(CONNECTOR_CHECKS, "connector", name, check, registry, connector=name)


def check_metric(name, check, registry=None, options=None):
    """Run one kit check (a key of ``METRIC_CHECKS``) against the installed metric ``name``."""
    _run(METRIC_CHECKS, "metric", name, check, registry, options)
