"""The course's ``decoder_model.bin``: GPT-2 small's state dict without the ``transformer.``
prefix, with the ``c_attn``/``c_fc``/``c_proj`` weights stored as HF's Conv1D keeps them,
``(in, out)``. Loading transposes them once into ``nn.Linear``'s ``(out, in)``, tolerates the
causal-mask buffers some exports carry, and refuses any other missing or unexpected key (the
course's own loader silently ignores them). Read with ``torch.load(weights_only=True)``: a
pickled object that is not plain tensors is refused."""
import hashlib
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
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise VlcapError(f"{path}: {str(key)[:60]!r} holds a {type(value).__name__}, not a tensor; "
                             "expected the course's decoder_model.bin")
    state = {k: v for k, v in state.items() if not k.endswith(MASK_BUFFER_SUFFIXES)}
    return {k: v.t() if k.endswith(CONV1D_SUFFIXES) else v for k, v in state.items()}


def course_shapes(cfg):
    """The shape of every tensor of a course file for decoder config ``cfg`` (``nn.Linear`` layout)."""
    n, vocab, block = cfg.n_embd, cfg.vocab_size, cfg.block_size
    per_block = {"ln_1": (n,), "attn.c_attn": (3 * n, n), "attn.c_proj": (n, n), "ln_2": (n,),
                 "mlp.c_fc": (4 * n, n), "mlp.c_proj": (n, 4 * n)}
    shapes = {"wte.weight": (vocab, n), "wpe.weight": (block, n), "ln_f.weight": (n,), "ln_f.bias": (n,)}
    for i in range(cfg.n_layer):
        for module, weight in per_block.items():
            shapes[f"h.{i}.{module}.weight"] = weight
            shapes[f"h.{i}.{module}.bias"] = (weight[0],)
    return shapes


def check_course_state(state, cfg, path):
    """Refuse, in one line naming ``path``, a course state that does not fit decoder config
    ``cfg``: the wrong format, another number of layers, or other sizes (which ones)."""
    expected = course_shapes(cfg)
    if any(key.startswith("transformer.") for key in state):
        raise VlcapError(f"{path}: keys start with 'transformer.' (a GPT2LMHeadModel state dict); the course's "
                         "decoder_model.bin has GPT-2's keys without the 'transformer.' prefix")
    layers = {key.split(".")[1] for key in state if key.startswith("h.")}
    if layers and len(layers) != cfg.n_layer:
        raise VlcapError(f"{path}: holds a {len(layers)}-layer decoder but the config has {cfg.n_layer} layers; "
                         "set model.decoder to the file's size (e.g. --set model.decoder.n_layer=...)")
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise VlcapError(f"{path}: does not match the decoder config (missing {few(missing)}; "
                         f"unexpected {few(unexpected)}); expected the course's decoder_model.bin")
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise VlcapError(f"{path}: {key} holds a {type(value).__name__}, not a tensor; expected decoder_model.bin")
        if tuple(value.shape) != expected[key]:
            raise VlcapError(f"{path}: {key} has shape {tuple(value.shape)} but the decoder config needs "
                             f"{expected[key]} (n_embd {cfg.n_embd}, vocab_size {cfg.vocab_size}, block_size "
                             f"{cfg.block_size}); set model.decoder to the file's size")


def load_course_weights(decoder, path, state=None):
    """Load a course-format ``decoder_model.bin`` into ``decoder`` (``state``: its tensors, when
    the caller already read and checked them); anything that does not fit is one line."""
    if state is None:
        state = read_course_state(path)
        check_course_state(state, decoder.cfg, path)
    decoder.load_state_dict(state, strict=False)


def save_course_weights(decoder, path):
    """Write ``decoder``'s pretrained part as a course-format ``decoder_model.bin`` (atomically)."""
    with atomic_write(path) as f:
        torch.save(course_state_dict(decoder), f)


def decoder_fingerprint(decoder, sample=4096):
    """A short hash of ``decoder``'s pretrained weights: every course tensor's name, shape and first
    ``sample`` values. Two different decoder files (another GPT-2, another fine-tune) differ in
    it; the same weights give the same fingerprint whatever file or layout they came from."""
    own = decoder.state_dict()
    digest = hashlib.sha256()
    for key in course_keys(decoder.cfg):
        tensor = own[key].detach()
        digest.update(f"{key}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.flatten()[:sample].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]

