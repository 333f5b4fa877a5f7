"""The built-in PEFT methods' own options (what every method must satisfy is the conformance
kit's: tests/test_conformance.py)."""
import pytest

from conftest import tiny_config
from vlcap.core.captioner import build_captioner
from vlcap.core.errors import VlcapError
from vlcap.core.peft import count_parameters


def build(registry, method, **options):
    return build_captioner(tiny_config(method, peft={"options": options}), registry)


def test_lora_targets_and_layers_decide_what_is_adapted(registry):
    captioner, _ = build(registry, "lora", targets=["mlp"], layers=[-1], r=2)
    names = [n for n, p in captioner.named_parameters() if "lora_" in n]
    assert names and all(n.startswith("decoder.h.1.mlp.") for n in names)


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
    ("lora", {"rank": 4}, r"unknown key\(s\) rank"),
    ("lora", {"targets": ["q", "x"]}, "targets"),
    ("adapter", {"placement": "middle"}, "placement"),
    ("adapter", {"layers": [7]}, "out of range"),
    ("prefix", {"length": 0}, "length"),
])
def test_bad_options_are_one_line_errors(registry, method, options, message):
    with pytest.raises(VlcapError, match=message):
        build(registry, method, **options)
