"""What every PEFT method shares: the plugin interface, freezing, counting and the budget.

A method only says *what* to change, through the captioner's hook points (self-attention q/k/v
and ``kv_prefix``, cross-attention, MLP, the ``post_*`` slots, ``input_prefix``, the projection,
``captioner.peft``), mapped in docs/design.md ("The hook-point map").

Trainability is the core's job, decided after the method ran: every parameter that came with
the pretrained encoder or decoder stays frozen, except the decoder's that the method declares in
``pretrained_to_train`` (BitFit's biases, LayerNorm gains); everything else (projection,
cross-attention, the method's new parameters) trains. A method that swaps a pretrained layer for
its own class must keep the pretrained Parameter objects (``swap_linear`` does): after ``apply``
the core refuses one that dropped or replaced any of them.

Cross-attention ``k``/``v``: on its default form ("auto", ``gpt2.CrossAttention.form``) training
folds their weights into the queries and never runs their forward, while the decoding cache
does. A method that hooks, wraps or replaces them calls ``project_image_tokens`` so training runs
them too (``swap_linear`` on them does it); after ``apply`` the core refuses one that did not.
"""
import contextlib
import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from vlcap.core.config import plugin_config
from vlcap.core.errors import VlcapError
from vlcap.core.plugins import plugin_call
from vlcap.core.model.gpt2 import CROSS_ATTENTION_FORMS, CrossAttention

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
    # False only for a method that adds no parameter (``none``: the connector alone trains); the
    # conformance kit holds a method to it either way.
    adds_parameters = True

    def apply(self, captioner, config):
        """Add the method's parameters/modules to ``captioner`` (see the hook points above).
        Runs after the decoder's pretrained weights are loaded (on a dry run, on the meta
        device: shapes only, no values), under a seed derived from ``model.init_seed``."""
        raise NotImplementedError

    def pretrained_to_train(self, captioner, config):
        """The pretrained decoder Parameters this method trains (e.g. every bias, for BitFit),
        as an iterable of the captioner's own Parameter objects; called right after ``apply``.
        They count as trainable (the budget included), are saved in checkpoints and loaded back
        over the pretrained values; all other pretrained parameters stay frozen."""
        return ()

    def merge(self, captioner):
        """Fold the trained parameters into the base weights for faster inference: afterwards
        the captioner computes the same outputs (within float rounding) without running the
        method's extra work. Called once, on an eval-mode captioner under ``torch.no_grad``; the
        merged captioner is only decoded with, never trained or saved."""
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


def keep_frozen(module):
    """Keep every parameter of ``module`` (one a method or connector adds) frozen, as the
    pretrained ones are: never trained, never saved, rebuilt from ``model.init_seed`` on load.
    For a random base that only a low-rank update adapts (loralib freezes the base it wraps).
    Returns ``module``."""
    mark_pretrained(module.parameters())
    return module


def apply_peft(captioner, method, options):
    """Run ``method`` on ``captioner``, check it kept every pretrained Parameter, then set
    trainability (new parameters, the connector's applied before, and the declared pretrained
    ones train). Returns the method's config."""
    config = plugin_config(method, options, "peft.options")
    pretrained = {id(p): name for name, p in captioner.named_parameters() if is_pretrained(p)}
    with plugin_call(method, "apply"):
        method.apply(captioner, config)
    check_pretrained_kept(captioner, method, pretrained)
    check_cross_attention_forms(captioner, method)
    trained = declared_pretrained(captioner, method, config)
    for p in captioner.parameters():
        p.requires_grad_(not is_pretrained(p) or id(p) in trained)
    return config


def check_pretrained_kept(captioner, method, pretrained):
    """Every pretrained Parameter object (``pretrained``: id -> name before ``apply``) must still be
    in the captioner: a method that replaced one (``lin.bias = nn.Parameter(lin.bias.clone())``)
    would silently train a pretrained weight and leave it out of the frozen-weight checks."""
    present = {id(p) for p in captioner.parameters()}
    lost = [name for key, name in pretrained.items() if key not in present]
    if lost:
        raise VlcapError(f"PEFT method '{method.name}' replaced or removed the pretrained parameter {lost[0]}"
                         f"{f' (and {len(lost) - 1} more)' if len(lost) > 1 else ''}; keep the pretrained "
                         "Parameter objects (swap_linear does) and declare the ones it trains in "
                         "pretrained_to_train")


def declared_pretrained(captioner, method, config):
    """The ids of the Parameters ``method.pretrained_to_train`` declares, each checked to be one of
    the captioner's pretrained decoder Parameters (the encoder stays frozen: the feature cache
    and ``encoder_features`` run it without autograd)."""
    names = {id(p): name for name, p in captioner.named_parameters()}
    trained = set()
    with plugin_call(method, "pretrained_to_train"):
        declared = list(method.pretrained_to_train(captioner, config) or ())
    for p in declared:
        name = names.get(id(p))
        if not isinstance(p, nn.Parameter) or name is None:
            raise VlcapError(f"PEFT method '{method.name}': pretrained_to_train gave a {type(p).__name__} that is "
                             "not a Parameter of the captioner; return the captioner's own Parameters")
        if not is_pretrained(p) or name.startswith("encoder."):
            what = "the frozen encoder's" if name.startswith("encoder.") else "not a pretrained parameter"
            raise VlcapError(f"PEFT method '{method.name}': pretrained_to_train names {name}, {what}; only the "
                             "pretrained decoder's parameters can be declared (new ones train anyway)")
        trained.add(id(p))
    return trained


def merge_peft(captioner, method):
    """Fold ``method`` into ``captioner``'s frozen weights once, for decoding only (``vlcap caption
    --merge``): the captions stay the same, each step skips the method's extra work. The merged
    captioner is frozen and marked ``merged`` (saving it is refused: its base weights changed)."""
    check_mergeable(method)
    captioner.eval()
    with torch.no_grad(), plugin_call(method, "merge"):
        method.merge(captioner)
    captioner.requires_grad_(False)
    captioner.merged = True
    return captioner


def check_mergeable(method):
    if not method.can_merge:
        raise VlcapError(f"PEFT method '{method.name}' cannot be merged into the base weights; caption without "
                         "--merge (the captions are the same, only slower)")


def project_image_tokens(cross_attention):
    """Make ``cross_attention`` (a ``decoder.h[i].cross_attn``) run its ``k`` and ``v`` on the
    image tokens in training, as decoding does: call it on every cross-attention whose ``k`` or
    ``v`` a method hooks, wraps or replaces. Returns ``cross_attention``."""
    if not isinstance(cross_attention, CrossAttention):
        raise TypeError(f"project_image_tokens takes a decoder.h[i].cross_attn, got {type(cross_attention).__name__}")
    cross_attention.form = "project"
    return cross_attention


def check_cross_attention_forms(captioner, method):
    """The safety net after ``method.apply``: a cross-attention still on "auto" whose ``k`` or
    ``v`` is no longer a plain, hook-free ``nn.Linear`` would train without the method's change
    (training reads their weights) and decode with it (the cache runs them): refused."""
    for name, attention in captioner.named_modules():
        if not isinstance(attention, CrossAttention):
            continue
        if attention.form not in CROSS_ATTENTION_FORMS:
            raise VlcapError(f"PEFT method '{method.name}' set {name}.form to {attention.form!r}; "
                             f"use one of {', '.join(CROSS_ATTENTION_FORMS)}")
        for part in ("k", "v") if attention.form == "auto" else ():
            change = linear_change(getattr(attention, part))
            if change:
                raise VlcapError(f"PEFT method '{method.name}' {change} {name}.{part} but left {name} on form "
                                 f"'auto', which trains without running it; call project_image_tokens({name}) "
                                 "in apply (swap_linear does it)")


def linear_change(layer):
    """How ``layer`` differs from a plain ``nn.Linear`` called as is, in words ("" if it does not)."""
    if type(layer) is not nn.Linear:
        return f"replaced (by {type(layer).__module__}.{type(layer).__qualname__})"
    hooks = {"forward": layer._forward_hooks, "forward-pre": layer._forward_pre_hooks,
             "backward": layer._backward_hooks, "backward-pre": layer._backward_pre_hooks}
    kinds = [kind for kind, registered in hooks.items() if registered]
    return f"put {'/'.join(kinds)} hook(s) on" if kinds else ""


def trainable_state(captioner):
    """Exactly the parameters with ``requires_grad`` (chosen by flag, never by name): the new
    ones and the pretrained ones the method declared in ``pretrained_to_train``."""
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
    """Parameter counts per part of the captioner (for reports; training uses the flags). The
    pretrained decoder parameters a method trains count as the decoder's trainable ones."""
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
    pretrained weight and bias Parameters over so they stay frozen and shared. On a
    cross-attention's ``k`` or ``v`` it also calls ``project_image_tokens``, so the new layer
    runs in training as in decoding."""
    old = getattr(parent, name)
    if tuple(new_linear.weight.shape) != tuple(old.weight.shape):
        raise ValueError(f"{name}: replacement has shape {tuple(new_linear.weight.shape)}, "
                         f"expected {tuple(old.weight.shape)}")
    new_linear.weight = old.weight
    new_linear.bias = old.bias
    setattr(parent, name, new_linear.to(old.weight.device))
    if isinstance(parent, CrossAttention) and name in ("k", "v"):
        project_image_tokens(parent)
    return new_linear


def select_layers(spec, n_layer, option="layers", section="peft.options"):
    """``"all"`` or a list of layer indices (negative counts from the top) -> sorted indices.
    ``section.option`` names the setting in errors (``connector.options`` for a connector)."""
    if spec == "all":
        return list(range(n_layer))
    if not isinstance(spec, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in spec):
        raise VlcapError(f"{section}.{option}: expected 'all' or a list of layer indices, got {spec!r}")
    bad = [i for i in spec if not -n_layer <= i < n_layer]
    if bad:
        raise VlcapError(f"{section}.{option}: layer(s) {bad} out of range for a {n_layer}-layer decoder")
    return sorted({i % n_layer for i in spec})


@contextlib.contextmanager
def seeded(seed):
    """Seed initialisation inside the block without disturbing the caller's random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
