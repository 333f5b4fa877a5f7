"""A method that hooks or replaces the cross-attention's k/v acts in training and in decoding alike
(``CrossAttention.form``, ``project_image_tokens``, ``swap_linear``, the core's check after ``apply``)."""
from dataclasses import dataclass

import loralib
import pytest
import torch

from vlcap.api import PeftMethod, perturb_trainable, pixels_for, project_image_tokens, swap_linear, tiny_captioner
from vlcap.core.errors import VlcapError
from vlcap.core.infer.decoding import generate_tokens
from vlcap.core.plugins import PluginEntry, Registry, registry as installed

CONNECTORS = installed().entries("connector")  # the test methods' registries hold the connectors too


@dataclass
class ScaledKeysConfig:
    scale: float = 3.0
    hook: bool = True  # False: the same model without the hook
    project: bool = True  # False: the mistake the core refuses (hook on k, form left on "auto")


class ScaledKeys(PeftMethod):
    """Test-only: every cross-attention's keys scaled by a forward hook on ``k`` (IA3-style)."""

    name = "scaled_keys"
    description = "scales the cross-attention keys through a forward hook"
    config_class = ScaledKeysConfig

    def __init__(self):
        self.calls = 0  # how often a hook ran

    def apply(self, captioner, config):
        for block in captioner.decoder.h:
            if config.hook:
                block.cross_attn.k.register_forward_hook(self.scale_by(config.scale))
                if config.project:
                    project_image_tokens(block.cross_attn)

    def scale_by(self, scale):
        def hook(module, inputs, output):
            self.calls += 1
            return output * scale
        return hook


def build(hook=True, project=True):
    """A tiny captioner with the test plugin applied (registered in a registry of its own)."""
    method = ScaledKeys()
    plugins = Registry([PluginEntry(method.name, "peft", "tests", "0", method.description, method), *CONNECTORS])
    captioner, tokenizer = tiny_captioner(method.name, plugins, hook=hook, project=project)
    perturb_trainable(captioner)  # a fresh cross-attention adds nothing (zero c_proj): make it count
    return captioner, tokenizer, method


def greedy(registry, captioner, tokenizer, cached=True):
    return generate_tokens(captioner, pixels_for(captioner), tokenizer, registry.get("decoding", "greedy"),
                           max_length=8, cached=cached)


def training_loss(captioner):
    pixels = pixels_for(captioner, images=2)
    ids = torch.randint(0, 50257, (2, 9), generator=torch.Generator().manual_seed(3))
    return captioner.train().loss(pixels, ids, ids)


def test_a_hook_on_k_changes_the_training_loss_and_the_decoded_tokens_alike(registry):
    plain, tokenizer, _ = build(hook=False)
    hooked, _, method = build()
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), hooked.state_dict().values()))
    # 9 text positions against 101 image tokens: "auto" would attend in memory space, never calling k.
    hooked_loss = training_loss(hooked)
    assert method.calls == len(hooked.decoder.h)  # once per layer in the training forward
    hooked_loss.backward()
    assert not torch.allclose(hooked_loss, training_loss(plain))
    decoded = greedy(registry, hooked.eval(), tokenizer)
    assert decoded != greedy(registry, plain.eval(), tokenizer)
    assert decoded == greedy(registry, hooked, tokenizer, cached=False)


def test_forgetting_the_switch_is_refused_after_apply():
    with pytest.raises(VlcapError, match=r"PEFT method 'scaled_keys' put forward hook\(s\) on decoder\.h\.0\."
                                         r"cross_attn\.k .*call project_image_tokens\(decoder\.h\.0\.cross_attn\)"):
        build(project=False)


def test_swap_linear_on_k_or_v_switches_to_projecting(registry):
    captioner, _ = tiny_captioner("lora", registry)
    block = captioner.decoder.h[0]
    swap_linear(block.cross_attn, "q", loralib.Linear(64, 64, r=2))
    assert block.cross_attn.form == "auto"  # q runs on the text either way
    swap_linear(block.cross_attn, "v", loralib.Linear(64, 64, r=2))
    assert block.cross_attn.form == "project"
    assert captioner.decoder.h[1].cross_attn.form == "auto"


def test_a_replaced_k_left_on_auto_is_refused():
    class Replaces(PeftMethod):
        name = "replaces_k"

        def apply(self, captioner, config):
            captioner.decoder.h[1].cross_attn.k = loralib.Linear(64, 64, r=2)  # not through swap_linear

    plugins = Registry([PluginEntry("replaces_k", "peft", "tests", "0", "", Replaces()), *CONNECTORS])
    with pytest.raises(VlcapError, match=r"'replaces_k' replaced \(by loralib\.layers\.Linear\) decoder\.h\.1\."
                                         r"cross_attn\.k but"):
        tiny_captioner("replaces_k", plugins)
