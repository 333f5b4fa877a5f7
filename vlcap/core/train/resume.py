"""What it takes to continue a run exactly where it stopped.

``RUN_DIR/resume/state.pt`` holds everything the next step depends on: every trainable
parameter (the training form, e.g. prefix tuning's MLP, not the exported checkpoint form), the
optimizer, scheduler and loss-scaler state, the Python/NumPy/torch (and CUDA) random states, the
data position (epoch + batches consumed; the order itself is rebuilt by ``distributed.EpochSampler``), the
step, the best value so far and the history. It is written atomically, so a kill leaves the
previous state intact, and read back with ``torch.load(weights_only=True)``: plain containers
and tensors only, no pickled code. The trainable-only safetensors files stay the exchange format.
"""
import contextlib
import dataclasses
import random
import signal
import threading
from pathlib import Path

import numpy as np
import torch

from vlcap.core import config as config_lib
from vlcap.core.atomic import atomic_write
from vlcap.core.config import RunConfig
from vlcap.core.errors import VlcapError

STATE_FILE = Path("resume") / "state.pt"


def state_path(run_dir):
    return Path(run_dir) / STATE_FILE


def rng_state():
    numpy = np.random.get_state(legacy=False)
    return {"python": random.getstate(),
            "numpy": {**numpy, "state": {"key": torch.from_numpy(numpy["state"]["key"].astype(np.int64)),
                                         "pos": numpy["state"]["pos"]}},
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    random.setstate(state["python"])
    numpy = state["numpy"]
    np.random.set_state({**numpy, "state": {"key": numpy["state"]["key"].numpy().astype(np.uint32),
                                            "pos": numpy["state"]["pos"]}})
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_state(run_dir, state):
    with atomic_write(state_path(run_dir)) as f:
        torch.save(state, f)


def load_state(run_dir):
    path = state_path(run_dir)
    if not path.is_file():
        raise VlcapError(f"{path}: no resume state; the run was started by a vlcap without resume "
                         "support or stopped before its first save (train.save_every)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unpickling failure means a damaged or foreign file
        raise VlcapError(f"{path}: damaged resume state ({type(exc).__name__}); "
                         "start the run again without --resume") from None


def resume_config(run_dir, device=None):
    """The run's own resolved ``config.yaml`` (only the device may change on resume)."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise VlcapError(f"{run_dir}: no config.yaml here; pass the --out directory of a vlcap train run")
    cfg = config_lib.from_dict(RunConfig, config_lib.load_yaml(path), where=str(path))
    if device is not None:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, device=device))
    return cfg


def restore_trainable(captioner, tensors, path):
    """Copy the saved trainable parameters in, refusing a state that belongs to another model."""
    params = {name: p for name, p in captioner.named_parameters() if p.requires_grad}
    if set(params) != set(tensors) or any(tensors[n].shape != p.shape for n, p in params.items()):
        raise VlcapError(f"{path}: the resume state does not match the model in config.yaml; "
                         "it was written by a different run")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name])


def ignore_interrupts_in_worker(worker_id):
    """DataLoader ``worker_init_fn``: Ctrl-C reaches the whole process group, and a worker that
    dies of it would crash the main process instead of letting it stop cleanly."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextlib.contextmanager
def stop_requests():
    """While training, SIGTERM/SIGINT ask for a clean stop (finish the step, save, exit) instead
    of killing the process. Yields a list that receives the signal's name. The first signal puts
    the previous handlers back, so a second one stops at once as it normally would."""
    caught = []
    if threading.current_thread() is not threading.main_thread():  # signals only reach the main thread
        yield caught
        return
    signals = (signal.SIGTERM, signal.SIGINT)
    previous = {s: signal.getsignal(s) for s in signals}

    def request_stop(signum, frame):
        caught.append(signal.Signals(signum).name)
        for s, handler in previous.items():
            signal.signal(s, handler)

    for s in signals:
        signal.signal(s, request_stop)
    try:
        yield caught
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
