"""What the core guarantees for every PEFT method: freezing, trainability, budget, merging."""
import pytest
import torch

from conftest import PEFT_METHODS, tiny_config
from vlcap.core.captioner import build_captioner
from vlcap.core.errors import VlcapError
from vlcap.core.peft import PeftMethod, count_parameters, is_pretrained
from vlcap.core.plugins import PluginEntry, Registry


def build(registry, method, **options):
    return build_captioner(tiny_config(method, peft={"options": options}), registry)


@pytest.mark.parametrize("method", PEFT_METHODS)
def test_only_new_parameters_train_and_get_gradients(registry, batch, method):
    captioner, _ = build(registry, method)
    pixels, ids = batch
    captioner.loss(pixels, ids, ids).backward()
    names = {n for n, p in captioner.named_parameters() if p.requires_grad}
    assert names and all(not is_pretrained(p) for n, p in captioner.named_parameters() if n in names)
    assert not any(n.startswith("encoder.") for n in names)
    assert {n for n, p in captioner.named_parameters() if p.grad is not None} <= names
    counts = count_parameters(captioner)
    assert counts.groups["peft"][0] > 0 and counts.groups["cross-attention"][0] > 0
    assert counts.groups["encoder"][0] == counts.groups["decoder"][0] == 0


@pytest.mark.parametrize("method", ["lora", "adapter"])
def test_zero_initialised_methods_start_from_the_base_model(registry, batch, method):
    class Nothing(PeftMethod):
        name = "nothing"

        def apply(self, captioner, config):
            pass

    only_nothing = Registry([PluginEntry("nothing", "peft", "tests", "0", "", Nothing())])
    base, _ = build_captioner(tiny_config("nothing"), only_nothing)
    captioner, _ = build(registry, method)
    assert count_parameters(captioner).trainable > count_parameters(base).trainable
    captioner.load_state_dict(base.state_dict(), strict=False)  # same projection/cross-attention
    with torch.no_grad():
        for p in base.decoder.h[0].cross_attn.c_proj.parameters():
            p.normal_(std=0.05)  # let the image matter, so the comparison is not trivially equal
        captioner.decoder.h[0].cross_attn.c_proj.load_state_dict(base.decoder.h[0].cross_attn.c_proj.state_dict())
        torch.testing.assert_close(captioner.eval()(*batch), base.eval()(*batch))


def test_lora_merged_equals_unmerged(registry, batch):
    captioner, method = build(registry, "lora", targets=["q", "k", "v", "attn_proj", "mlp"])
    with torch.no_grad():
        for name, p in captioner.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)  # trained-looking, non-zero updates
        captioner.eval()
        unmerged = captioner(*batch)
        before = captioner.decoder.h[0].attn.c_attn.weight.clone()
        method.merge(captioner)
        merged = captioner(*batch)
    assert not torch.equal(captioner.decoder.h[0].attn.c_attn.weight, before)  # really folded in
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-4)


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
