"""The built-in PEFT methods' own options (what every method must satisfy is the conformance
kit's: tests/test_conformance.py)."""
import loralib
import pytest
import torch

from conftest import tiny_config
from vlcap.core.model.captioner import build_captioner
from vlcap.core.errors import VlcapError
from vlcap.core.model.peft import count_parameters
from vlcap.plugins.peft_lora.layer import MergedLinear


def build(registry, method, **options):
    return build_captioner(tiny_config(method, peft={"options": options}), registry)[:2]


def test_lora_targets_and_layers_decide_what_is_adapted(registry):
    captioner, _ = build(registry, "lora", targets=["mlp"], layers=[-1], r=2)
    names = [n for n, p in captioner.named_parameters() if "lora_" in n]
    assert names and all(n.startswith("decoder.h.1.mlp.") for n in names)


@pytest.mark.parametrize("enable", [[True, False, True], [False, True, False], [True, True, True]])
def test_lora_low_rank_forward_equals_loralibs(enable):
    """vlcap's MergedLinear forward (A, then each slice's B) computes what loralib's (full B@A
    update) does, with the same gradients, and merges into the same weight."""
    torch.manual_seed(0)
    ours = MergedLinear(12, 36, r=2, lora_alpha=4, enable_lora=enable)
    theirs = loralib.MergedLinear(12, 36, r=2, lora_alpha=4, enable_lora=enable)
    with torch.no_grad():
        ours.lora_B.normal_()  # loralib starts B at zero: the update would be nothing to compare
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(3, 5, 12, requires_grad=True)
    out_ours, out_theirs = ours(x), theirs(x)
    torch.testing.assert_close(out_ours, out_theirs)
    grad = torch.randn_like(out_ours)
    grads_ours = torch.autograd.grad(out_ours, [x, ours.lora_A, ours.lora_B], grad)
    grads_theirs = torch.autograd.grad(out_theirs, [x, theirs.lora_A, theirs.lora_B], grad)
    for a, b in zip(grads_ours, grads_theirs):
        torch.testing.assert_close(a, b)
    ours.merge_weights = True
    ours.train(False)
    torch.testing.assert_close(ours(x), out_theirs)


def test_adapter_placements(registry):
    houlsby, _ = build(registry, "adapter")
    pfeiffer, _ = build(registry, "adapter", placement="pfeiffer", reduction=8)
    assert count_parameters(houlsby).groups["peft"][0] == 2 * 2 * (64 * 4 + 4 + 4 * 64 + 64)
    assert count_parameters(pfeiffer).groups["peft"][0] == 2 * (64 * 8 + 8 + 8 * 64 + 64)


def test_prefix_changes_attention_and_trains(registry, batch):
    captioner, _ = build(registry, "prefix", length=4, reparam=False)
    assert captioner.peft["prefix"].kv.shape == (2, 2, 4, 64)
    pixels, ids = batch
    captioner.loss(pixels, ids, ids).backward()
    assert captioner.peft["prefix"].kv.grad.abs().sum() > 0


@pytest.mark.parametrize("method, options, message", [
    ("lora", {"rank": 4}, r"unknown key peft.options.rank; known: r, alpha"),
    ("lora", {"targets": ["q", "x"]}, "targets"),
    ("adapter", {"placement": "middle"}, "placement"),
    ("adapter", {"layers": [7]}, "out of range"),
    ("prefix", {"length": 0}, "length"),
])
def test_bad_options_are_one_line_errors(registry, method, options, message):
    with pytest.raises(VlcapError, match=message):
        build(registry, method, **options)
