"""What every PEFT method shares: the plugin interface, freezing, counting and the budget.

A method only says *what* to change, through the captioner's hook points:

==========================================  ===============================================
``captioner.decoder.h[i].attn``              self-attention: ``c_attn`` (fused q,k,v Linear),
                                             ``c_proj``, ``kv_prefix`` (a callable
                                             ``batch_size -> (k, v)`` of extra keys/values)
``captioner.decoder.h[i].cross_attn``        cross-attention: ``q``, ``k``, ``v``, ``c_proj``
``captioner.decoder.h[i].mlp``               ``c_fc``, ``c_proj``
``captioner.decoder.h[i].post_attn`` /       identity slots applied to each sub-layer's output
``post_cross_attn`` / ``post_mlp``           before the residual add
``captioner.decoder.wte``                    input embeddings (tied to the LM head, frozen)
``captioner.decoder.input_prefix``           a callable ``batch_size -> (B, P, n_embd)``: input
                                             embeddings placed before the text (prompt tuning);
                                             they take positions 0..P-1, their outputs are
                                             dropped, decoding caches them once per image
``captioner.projection``                     image tokens -> decoder width
``captioner.peft``                           ModuleDict for modules the method owns outright
==========================================  ===============================================

Trainability is the core's job, decided after the method ran: every parameter that came with
the pretrained encoder or decoder stays frozen, everything else (projection, cross-attention,
the method's new parameters) trains. A method that swaps a pretrained layer for its own class
must keep the pretrained Parameter objects (``swap_linear`` does).
"""
import contextlib
import dataclasses
from dataclasses import dataclass

import torch

from vlcap.core.config import plugin_config
from vlcap.core.errors import VlcapError

MAX_TRAINABLE = 35_000_000
_PRETRAINED_FLAG = "_vlcap_pretrained"


class PeftMethod:
    """Base class for PEFT plugins. Subclasses set the class attributes and implement ``apply``."""

    name = ""
    description = ""
    config_class = None  # a dataclass of the method's options, all with defaults
    can_merge = False  # True if ``merge`` folds the method into the frozen weights
    # True if a freshly applied method leaves the captioner's output unchanged (e.g. LoRA's zero
    # B, an adapter's zero up-projection): training then starts from the pretrained model. The
    # conformance kit (vlcap.testing) holds a method to this claim.
    zero_init = False

    def apply(self, captioner, config):
        """Add the method's parameters/modules to ``captioner`` (see the hook points above)."""
        raise NotImplementedError

    def merge(self, captioner):
        """Fold the trained parameters into the base weights for faster inference."""
        raise VlcapError(f"PEFT method '{self.name}' cannot be merged")

    def export(self, captioner, config):
        """The trainable state and config to save. Override to save a different but equivalent
        form (e.g. drop a training-only reparameterisation); loading applies the returned config."""
        return trainable_state(captioner), config


def config_dict(config):
    return dataclasses.asdict(config) if config is not None else {}


def mark_pretrained(params):
    for p in params:
        setattr(p, _PRETRAINED_FLAG, True)


def is_pretrained(param):
    return getattr(param, _PRETRAINED_FLAG, False)


def apply_peft(captioner, method, options):
    """Run ``method`` on ``captioner``, then set trainability. Returns the method's config."""
    config = plugin_config(method, options, "peft.options")
    method.apply(captioner, config)
    for p in captioner.parameters():
        p.requires_grad_(not is_pretrained(p))
    return config


def trainable_state(captioner):
    """Exactly the parameters with ``requires_grad`` (chosen by flag, never by name)."""
    return {name: p.detach() for name, p in captioner.named_parameters() if p.requires_grad}


@dataclass
class ParameterCount:
    groups: dict  # group -> (trainable, frozen)

    @property
    def trainable(self):
        return sum(t for t, _ in self.groups.values())

    @property
    def frozen(self):
        return sum(f for _, f in self.groups.values())


def parameter_group(name, pretrained=False):
    """Which part of the captioner a parameter belongs to (for reports only)."""
    if name.startswith("encoder."):
        return "encoder"
    if name.startswith("projection."):
        return "projection"
    if ".cross_attn." in name or ".ln_cross." in name:
        return "cross-attention"
    return "decoder" if pretrained else "peft"


def count_parameters(captioner):
    """Parameter counts per part of the captioner (for reports; training uses the flags)."""
    groups = {}
    for name, p in captioner.named_parameters():
        group = parameter_group(name, is_pretrained(p))
        trainable, frozen = groups.get(group, (0, 0))
        groups[group] = (trainable + p.numel(), frozen) if p.requires_grad else (trainable, frozen + p.numel())
    return ParameterCount(groups)


def check_budget(trainable, what="this model"):
    if trainable > MAX_TRAINABLE:
        raise VlcapError(f"{what} has {trainable:,} trainable parameters, over the {MAX_TRAINABLE:,} "
                         "budget; lower the PEFT method's size (rank, reduction, prefix length)")


def swap_linear(parent, name, new_linear):
    """Replace ``parent.<name>`` (an nn.Linear) by ``new_linear`` of the same shape, moving the
    pretrained weight and bias Parameters over so they stay frozen and shared."""
    old = getattr(parent, name)
    if tuple(new_linear.weight.shape) != tuple(old.weight.shape):
        raise ValueError(f"{name}: replacement has shape {tuple(new_linear.weight.shape)}, "
                         f"expected {tuple(old.weight.shape)}")
    new_linear.weight = old.weight
    new_linear.bias = old.bias
    setattr(parent, name, new_linear.to(old.weight.device))
    return new_linear


def select_layers(spec, n_layer, option="layers"):
    """``"all"`` or a list of layer indices (negative counts from the top) -> sorted indices."""
    if spec == "all":
        return list(range(n_layer))
    if not isinstance(spec, (list, tuple)) or not all(isinstance(i, int) for i in spec):
        raise VlcapError(f"peft.options.{option}: expected 'all' or a list of layer indices, got {spec!r}")
    bad = [i for i in spec if not -n_layer <= i < n_layer]
    if bad:
        raise VlcapError(f"peft.options.{option}: layer(s) {bad} out of range for a {n_layer}-layer decoder")
    return sorted({i % n_layer for i in spec})


@contextlib.contextmanager
def seeded(seed):
    """Seed initialisation inside the block without disturbing the caller's random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
