"""The course's ``decoder_model.bin``: GPT-2 small's state dict without the ``transformer.``
prefix, with the ``c_attn``/``c_fc``/``c_proj`` weights stored as HF's Conv1D keeps them,
``(in, out)``. Loading transposes them once into ``nn.Linear``'s ``(out, in)``, tolerates the
causal-mask buffers some exports carry, and refuses any other missing or unexpected key (the
course's own loader silently ignores them). Read with ``torch.load(weights_only=True)``: a
pickled object that is not plain tensors is refused."""
from collections import OrderedDict
from pathlib import Path

import torch

from vlcap.core.atomic import atomic_write
from vlcap.core.errors import VlcapError, few

# Weights the course (and HF's Conv1D) store as (in, out); nn.Linear wants (out, in).
CONV1D_SUFFIXES = (".c_attn.weight", ".c_fc.weight", ".c_proj.weight")
# Causal-mask buffers some GPT-2 exports carry; they hold no learned values.
MASK_BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias")
BLOCK_MODULES = ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj")


def course_keys(cfg):
    """The keys of a course ``decoder_model.bin`` for decoder config ``cfg``, in GPT-2's order."""
    keys = ["wte.weight", "wpe.weight"]
    for i in range(cfg.n_layer):
        keys += [f"h.{i}.{module}.{kind}" for module in BLOCK_MODULES for kind in ("weight", "bias")]
    return keys + ["ln_f.weight", "ln_f.bias"]


def course_state_dict(decoder):
    """``decoder``'s state dict in the course layout: GPT-2's own tensors only, Conv1D weights
    transposed. (Looked up by GPT-2's key names, so modules a PEFT method added never appear.)"""
    own = decoder.state_dict()
    return OrderedDict((key, own[key].t().contiguous() if key.endswith(CONV1D_SUFFIXES) else own[key])
                       for key in course_keys(decoder.cfg))


def read_course_state(path):
    """The tensors of a course-format file at ``path``, in ``nn.Linear`` layout, mask buffers dropped."""
    path = Path(path)
    if not path.is_file():
        raise VlcapError(f"{path}: decoder weights not found; pass --decoder-weights PATH/decoder_model.bin")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise VlcapError(f"{path}: not a readable torch state dict ({type(exc).__name__}); "
                         "expected the course's decoder_model.bin") from exc
    if not isinstance(state, dict):
        raise VlcapError(f"{path}: holds a {type(state).__name__}, not a state dict; expected decoder_model.bin")
    state = {k: v for k, v in state.items() if not k.endswith(MASK_BUFFER_SUFFIXES)}
    return {k: v.t() if k.endswith(CONV1D_SUFFIXES) else v for k, v in state.items()}


def load_course_weights(decoder, path):
    """Load a course-format ``decoder_model.bin`` into ``decoder``; any missing or unknown key, or
    a shape that differs from the decoder config, is one ``VlcapError`` line."""
    state = read_course_state(path)
    expected = set(course_keys(decoder.cfg))
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise VlcapError(f"{path}: does not match the decoder config (missing {few(missing)}; "
                         f"unexpected {few(unexpected)}); expected a GPT-2 state dict without "
                         "the 'transformer.' prefix")
    own = decoder.state_dict()
    for key, value in state.items():
        if value.shape != own[key].shape:
            raise VlcapError(f"{path}: {key} has shape {tuple(value.shape)} but the decoder config "
                             f"needs {tuple(own[key].shape)}; set model.decoder to the checkpoint's size")
    decoder.load_state_dict(state, strict=False)


def save_course_weights(decoder, path):
    """Write ``decoder``'s pretrained part as a course-format ``decoder_model.bin`` (atomically)."""
    with atomic_write(path) as f:
        torch.save(course_state_dict(decoder), f)
