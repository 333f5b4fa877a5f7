"""The checks of the conformance kit (see ``vlcap.testing``). Every check takes the plugin's name,
the registry and the connector (a name) to run under: ``check_peft_method`` and
``check_decoding_strategy`` run each check under every installed connector."""
import tempfile

import pytest
import torch

from vlcap.core import config as config_lib
from vlcap.core.infer.decoding import next_token_model
from vlcap.core.model.captioner import build_captioner, tokenizer_for
from vlcap.core.model.checkpoint import load_checkpoint, save_checkpoint
from vlcap.core.model.peft import PeftMethod, check_budget, count_parameters, is_pretrained
from vlcap.core.plugins import PluginEntry, Registry, registry as installed_registry
from vlcap.core.train.trainer import prepare_model
from vlcap.testing.builders import (FULL_SIZE_ENCODER, IMAGES, MAX_LENGTH, connector_config, decoding_captioner,
                                    generate, perturb_trainable, pixels_for, token_ids)

# --- PEFT method checks -----------------------------------------------------------------

def check_gradients(name, registry, connector):
    """Only the method's and the core's new parameters train; the pretrained ones stay frozen and
    get no gradient; every trainable tensor gets a non-zero gradient from the loss. The trainable
    parameters are perturbed first: at a zero init (LoRA's B, the cross-attention output) the
    parameters behind it get exactly zero gradient, which would hide a tensor that is not wired in."""
    captioner = build_captioner(connector_config(name, connector), registry).captioner
    perturb_trainable(captioner, std=0.05)
    pixels = pixels_for(captioner, 2)
    ids = token_ids(2, 7, captioner.decoder.cfg.vocab_size)
    captioner.loss(pixels, ids, ids).backward()
    for pname, p in captioner.named_parameters():
        if is_pretrained(p):
            assert not p.requires_grad and p.grad is None, f"pretrained parameter {pname} trains"
        else:
            assert p.requires_grad, f"{pname} is new but frozen"
            assert p.grad is not None, f"{pname} is trainable but does not reach the loss"
            assert p.grad.abs().sum() > 0, f"{pname} is trainable but its gradient is zero"
    counts = count_parameters(captioner)
    check_adds_parameters(name, registry, counts)
    assert counts.groups["encoder"][0] == counts.groups["decoder"][0] == 0


def check_adds_parameters(name, registry, counts):
    added = counts.groups.get("peft", (0, 0))[0]
    if registry.get("peft", name).adds_parameters:
        assert added > 0, f"PEFT method '{name}' added no trainable parameter"
    else:
        assert added == 0, f"PEFT method '{name}' claims adds_parameters=False but added {added:,}"


def check_save_load(name, registry, connector):
    """A saved checkpoint loads into a captioner with exactly the same logits."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = connector_config(name, connector)
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


def check_merge(name, registry, connector):
    """Where the method claims ``can_merge``, merged logits and captions equal unmerged ones."""
    method = registry.get("peft", name)
    if not method.can_merge:
        pytest.skip(f"PEFT method '{name}' does not claim can_merge")
    cfg = connector_config(name, connector)
    captioner = build_captioner(cfg, registry).captioner
    perturb_trainable(captioner, std=0.05).eval()
    tokenizer = tokenizer_for(cfg)
    pixels, ids = pixels_for(captioner, 2), token_ids(2, 7, cfg.model.decoder.vocab_size)
    greedy = registry.get("decoding", "greedy")
    with torch.no_grad():
        before = [p.clone() for p in captioner.parameters() if is_pretrained(p)]
        unmerged = captioner(pixels, ids)
        captions = generate(captioner, tokenizer, greedy, {}, cached=True, images=2)
        method.merge(captioner)
        changed = any(not torch.equal(a, p) for a, p in zip(before, (p for p in captioner.parameters() if is_pretrained(p))))
        assert changed, f"'{name}'.merge left every pretrained weight unchanged"
        torch.testing.assert_close(captioner(pixels, ids), unmerged, rtol=1e-4, atol=1e-4)
    assert generate(captioner, tokenizer, greedy, {}, cached=True, images=2) == captions


def check_beam1_is_greedy(name, registry, connector):
    """Beam search with one beam is greedy decoding."""
    captioner, tokenizer = decoding_captioner(name, registry, connector)
    greedy = generate(captioner, tokenizer, registry.get("decoding", "greedy"), {}, cached=True)
    assert generate(captioner, tokenizer, registry.get("decoding", "beam"), {"num_beams": 1}, cached=True) == greedy


def check_cached_decoding(name, registry, connector):
    """The decoding cache equals full recompute: next-token logits through expand and reorder,
    and the captions of greedy and 3-beam search."""
    captioner, tokenizer = decoding_captioner(name, registry, connector)
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
            # float32 sums in another order: logits of magnitude ~10 agree to ~1e-4 of that scale
            torch.testing.assert_close(cached.logits(rows), full.logits(rows), rtol=1e-4, atol=1e-3)
    for strategy, options in (("greedy", {}), ("beam", {"num_beams": 3})):
        strategy = registry.get("decoding", strategy)
        assert generate(captioner, tokenizer, strategy, options, cached=True) == \
            generate(captioner, tokenizer, strategy, options, cached=False), f"cached {strategy.name} differs"


def check_budget_at_full_size(name, registry, connector):
    """With its default options, on GPT-2 small and the largest course encoder, the model stays
    within the 35M trainable-parameter budget (built as shapes only, like ``train --dry-run``)."""
    cfg = config_lib.resolve("full", overrides=[{"peft": {"method": name}, "connector": {"name": connector},
                                                 "model": {"encoder": FULL_SIZE_ENCODER}}])
    captioner = build_captioner(cfg, registry, meta=True).captioner
    counts = count_parameters(captioner)
    check_adds_parameters(name, registry, counts)
    check_budget(counts.trainable, what=f"'{name}' with its default options under connector '{connector}' at full size")


class _NoMethod(PeftMethod):
    name = "kit-none"

    def apply(self, captioner, config):
        pass


def check_zero_init(name, registry, connector):
    """Where the method claims ``zero_init``, a freshly applied method leaves the output unchanged."""
    if not registry.get("peft", name).zero_init:
        pytest.skip(f"PEFT method '{name}' does not claim zero_init")
    base_registry = Registry([PluginEntry("kit-none", "peft", "kit", "0", "", _NoMethod()),
                              *registry.entries("connector")])
    base = build_captioner(connector_config("kit-none", connector), base_registry).captioner
    captioner = build_captioner(connector_config(name, connector), registry).captioner
    with torch.no_grad():
        # Let the image matter (a cross-attention output starts at zero), the same in both.
        perturb_trainable(base, std=0.05)
        captioner.load_state_dict(base.state_dict(), strict=False)
        pixels, ids = pixels_for(base, 2), token_ids(2, 7, base.decoder.cfg.vocab_size)
        torch.testing.assert_close(captioner.eval()(pixels, ids), base.eval()(pixels, ids))


PEFT_CHECKS = {
    "gradients": check_gradients,
    "save_load": check_save_load,
    "merge": check_merge,
    "beam1_is_greedy": check_beam1_is_greedy,
    "cached_decoding": check_cached_decoding,
    "budget": check_budget_at_full_size,
    "zero_init": check_zero_init,
}


# --- decoding strategy checks ------------------------------------------------------------

DECODING_METHOD = "prefix"  # its prefix keys/values sit in the cache, the hardest case for one


def check_valid_output(name, registry, connector):
    """With its default options the strategy returns, per image, a list of token ids of the
    vocabulary, at most ``max_length`` long, without the end token."""
    captioner, tokenizer = decoding_captioner(DECODING_METHOD, registry, connector)
    out = generate(captioner, tokenizer, registry.get("decoding", name), {}, cached=True)
    assert isinstance(out, list) and len(out) == IMAGES, f"'{name}' must return one token list per image"
    for tokens in out:
        assert isinstance(tokens, list) and len(tokens) <= MAX_LENGTH
        assert all(isinstance(t, int) and 0 <= t < tokenizer.vocab_size for t in tokens)
        assert tokenizer.eot_id not in tokens


def check_strategy_cached_equals_recompute(name, registry, connector):
    """The strategy gives the same captions through the cache as with full recompute."""
    captioner, tokenizer = decoding_captioner(DECODING_METHOD, registry, connector)
    strategy = registry.get("decoding", name)
    assert generate(captioner, tokenizer, strategy, {}, cached=True) == \
        generate(captioner, tokenizer, strategy, {}, cached=False)


DECODING_CHECKS = {
    "valid_output": check_valid_output,
    "cached_equals_recompute": check_strategy_cached_equals_recompute,
}


# A connector's checks: the PEFT checks that concern it, with no PEFT method ("none", vlcap's
# own), so only the connector trains. Every PEFT method is checked under every connector above.
CONNECTOR_METHOD = "none"
CONNECTOR_CHECKS = {check: PEFT_CHECKS[check]
                    for check in ("gradients", "save_load", "beam1_is_greedy", "cached_decoding", "budget")}


_passed = set()


def _run(checks, kind, name, check, registry, connector=None):
    """Run ``check`` for plugin ``name`` under ``connector`` (None: every installed one)."""
    if check not in checks:
        raise ValueError(f"unknown check '{check}'; the kit has {', '.join(checks)}")
    registry = registry or installed_registry()
    registry.get(kind, name)  # an unknown name fails here, listing the installed ones
    if connector is not None:
        registry.get("connector", connector)
    for each in [connector] if connector is not None else registry.names("connector"):
        key = (kind, name, check, each, id(registry))
        if key in _passed:  # the same plugin code, the same check: once per process is enough
            continue
        if kind == "connector":
            checks[check](CONNECTOR_METHOD, registry, name)
        else:
            checks[check](name, registry, each)
        _passed.add(key)


def check_peft_method(name, check, registry=None, connector=None):
    """Run one kit check (a key of ``PEFT_CHECKS``) against the installed PEFT method ``name``,
    under ``connector`` (a name; default: under every installed connector)."""
    _run(PEFT_CHECKS, "peft", name, check, registry, connector)


def check_decoding_strategy(name, check, registry=None, connector=None):
    """Run one kit check (a key of ``DECODING_CHECKS``) against the installed strategy ``name``,
    under ``connector`` (a name; default: under every installed connector)."""
    _run(DECODING_CHECKS, "decoding", name, check, registry, connector)


def check_connector(name, check, registry=None):
    """Run one kit check (a key of ``CONNECTOR_CHECKS``) against the installed connector ``name``,
    with no PEFT method, so only the connector trains."""
    _run(CONNECTOR_CHECKS, "connector", name, check, registry, connector=name)
