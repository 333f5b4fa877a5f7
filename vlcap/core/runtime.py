"""Where, in what precision and in which mode vlcap computes: the one place that chooses a device,
a dtype, and switches a model to evaluation.

Every command that runs a model resolves ``--device`` here, up front, so a device that does not
exist is one line before anything loads. Reduced precision follows one rule, in training
(``train.amp``) and inference (``--precision``) alike: on CUDA, bf16 only where the GPU computes
it natively (compute capability 8.0 and above; older GPUs emulate it slowly), else fp16; on CPU,
full precision unless a reduced one is asked for. Inference never inherits training's setting: a
checkpoint trained in bf16 decodes in whatever ``--precision`` says.
"""
import contextlib

import torch

from vlcap.core.config import AMP_CHOICES, PRECISIONS
from vlcap.core.errors import VlcapError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def available_devices():
    """What this machine offers, for error messages: ``cpu, cuda:0 (NVIDIA ...)``."""
    names = ["cpu"]
    if torch.cuda.is_available():
        names += [f"cuda:{i} ({torch.cuda.get_device_name(i)})" for i in range(torch.cuda.device_count())]
    return ", ".join(names)


def resolve_device(name="auto"):
    """``auto`` (CUDA when there is a GPU, else CPU), ``cpu``, ``cuda`` or ``cuda:N``; anything
    else, or a GPU that is not there, is one ``VlcapError`` line naming what is available."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise VlcapError(f"--device {name!r}: not a device; use auto, cpu, cuda or cuda:N "
                         f"(available here: {available_devices()})") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise VlcapError(f"--device {name!r}: vlcap runs on cpu or cuda; available here: {available_devices()}")
    if not torch.cuda.is_available():
        raise VlcapError(f"--device {name}: no CUDA GPU is available here (torch {torch.__version__}, "
                         f"CUDA build {torch.version.cuda or 'none'}); use --device cpu")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise VlcapError(f"--device {name}: there is no GPU {device.index}; available here: {available_devices()}")
    return device


def native_bf16(device):
    """True where ``device`` computes bf16 natively (CUDA compute capability 8.0+, i.e. Ampere and
    later). ``torch.cuda.is_bf16_supported()`` also says yes where bf16 is only emulated."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8


def reduced_dtype(device):
    """The reduced precision ``device`` computes fastest: bf16 with native bf16, else fp16."""
    return torch.bfloat16 if native_bf16(device) else torch.float16


def autocast_dtype(amp, device):
    """The autocast dtype for ``amp`` (``train.amp``: auto | off | bf16 | fp16) on ``device``, or
    None for full precision. ``auto``: bf16 on GPUs with native bf16, fp16 (with loss scaling in
    training) on older GPUs, full precision on CPU."""
    if amp not in AMP_CHOICES:
        raise VlcapError(f"train.amp: {amp!r} is not one of {', '.join(AMP_CHOICES)}")
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "auto":
        return reduced_dtype(device)
    if amp == "fp16" and device.type != "cuda":
        return None  # fp16 autocast on CPU is slower than fp32 and has no loss scaling there
    return DTYPES[amp]


def inference_dtype(precision, device, auto_on_cuda=None):
    """The dtype a command computes in for ``--precision`` (auto | fp32 | bf16 | fp16) on
    ``device``; None for full precision. ``auto``: fp32 on CPU; on CUDA ``auto_on_cuda`` when
    the caller names one (CLIP: the fp16 its weights were released in), else ``reduced_dtype``.
    An explicit bf16 or fp16 is honoured on any device (slow on a CPU, but what was asked)."""
    if precision not in PRECISIONS:
        raise VlcapError(f"--precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision == "auto":
        return auto_on_cuda or reduced_dtype(device)
    return DTYPES[precision]


def dtype_name(dtype):
    """``fp32`` for None (full precision), ``bf16``/``fp16`` for the reduced dtypes."""
    return {None: "fp32", torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def autocast(device, dtype):
    """``torch.autocast`` for ``dtype`` on ``device``; a no-op when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@contextlib.contextmanager
def evaluating(module):
    """``module`` in eval mode (dropout off) inside the block, its previous mode restored after."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)
