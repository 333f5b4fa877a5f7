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
import os
import random
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from vlcap.core import config as config_lib
from vlcap.core.atomic import atomic_write
from vlcap.core.config import RunConfig
from vlcap.core.errors import VlcapError

STATE_FILE = Path("resume") / "state.pt"
LOCK_FILE = ".vlcap-train.lock"


@contextlib.contextmanager
def run_lock(run_dir, command="vlcap train"):
    """Hold ``run_dir`` for one training run: a second run into it (or a resume of it) while the
    first is alive is one line naming the first one's PID. The lock is the kernel's (``flock``),
    so a killed run leaves no stale lock; the file keeps the holder's PID for the message. Under
    torchrun only rank 0 takes it (the other processes write nothing there)."""
    try:
        import fcntl
    except ImportError:  # not on POSIX: no lock
        yield
        return
    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            raise VlcapError(f"{run_dir}: in use by another {command} (PID {holder}); wait for it to end, "
                             "or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def refuse_replacing(run_dir, overwrite, command="vlcap train"):
    """A new run into ``run_dir`` would delete the resume state of the run already there (and
    overwrite its checkpoints): refused unless ``overwrite``; with it the old state goes."""
    path = state_path(run_dir)
    if not path.exists():
        return
    if not overwrite:
        raise VlcapError(f"{run_dir}: holds another run (its resume state {path}); continue it with "
                         f"{command} --resume {run_dir}, choose another --out, or pass --overwrite to replace it")
    path.unlink()


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


@dataclass
class TrainState:
    """Where a run stands, apart from the weights, optimizer, scheduler and loss scaler (which
    keep their own state): the counters the next step depends on. The resume state holds these
    fields under their own names next to the others."""
    epoch: int = 0  # the epoch in progress (the next one, once an epoch has ended)
    batches: int = 0  # micro-batches of that epoch already trained on
    step: int = 0  # optimizer steps taken
    running: float = 0.0  # this process's token-weighted loss sum in the epoch so far
    seen: int = 0  # images this process trained on in the epoch so far
    tokens: int = 0  # caption tokens this process trained on in the epoch so far
    skipped_batches: int = 0  # DDP: micro-batches every process skipped, one having no readable image
    best_value: Optional[float] = None  # the best value so far of the number that selects best.safetensors
    history: list = field(default_factory=list)  # one record per finished epoch
    unreadable: set = field(default_factory=set)  # one message per image file that could not be read

    def next_epoch(self):
        """The epoch ended: the next one starts at its first batch with fresh loss counters."""
        self.epoch, self.batches = self.epoch + 1, 0
        self.running, self.seen, self.tokens = 0.0, 0, 0

    def to_dict(self):
        return {"epoch": self.epoch, "batches": self.batches, "step": self.step, "running": self.running,
                "seen": self.seen, "tokens": self.tokens, "skipped_batches": self.skipped_batches,
                "best_value": self.best_value, "history": self.history, "unreadable": sorted(self.unreadable)}

    @classmethod
    def from_dict(cls, saved):
        return cls(epoch=saved["epoch"], batches=saved["batches"], step=saved["step"], running=saved["running"],
                   seen=saved["seen"], tokens=saved["tokens"],
                   skipped_batches=saved.get("skipped_batches", 0),  # absent from states written before it was counted
                   best_value=saved["best_value"], history=saved["history"], unreadable=set(saved["unreadable"]))


def save_training(run_dir, state, named_trainable, optimizer, scheduler, scaler):
    """Write the resume state: ``state``, the trainable parameters, optimizer, scheduler, loss
    scaler and every random number generator, as they are now."""
    save_state(run_dir, {
        "trainable": {name: p.detach().cpu() for name, p in named_trainable},
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
        "rng": rng_state(), **state.to_dict()})


def restore_training(saved, captioner, optimizer, scheduler, scaler, path):
    """Put a loaded resume state back into the freshly built run and return its ``TrainState``.
    Call it once everything that draws random numbers is built: it sets the generators last.

    The scheduler is not restored but set to the saved step: the learning rate is a function of
    the step and the run's length (``trainer.build_scheduler``, built from the config being
    resumed), so an unchanged run gets exactly the rate it had, and a run resumed with a new
    length follows the cosine schedule planned over the new total. (The saved scheduler state
    would bring back the old length.)"""
    restore_trainable(captioner, saved["trainable"], path)
    optimizer.load_state_dict(saved["optimizer"])
    scaler.load_state_dict(saved["scaler"])
    state = TrainState.from_dict(saved)
    scheduler.step_update(state.step)
    set_rng_state(saved["rng"])
    return state


def stopped(signal_name, step, total_steps, run_dir, command="vlcap train"):
    """The error a run stopped by a signal ends with: where it stopped and how to continue
    (``command``: the one that trains it)."""
    return VlcapError(f"stopped by {signal_name} at step {step} of {total_steps}; state saved to "
                      f"{state_path(run_dir)}; continue with: {command} --resume {run_dir}")


def resume_config(run_dir, train_overrides=None, config_class=RunConfig, command="vlcap train"):
    """The run's own resolved ``config.yaml`` (a ``config_class``: a captioner's or a classifier's
    run, made by ``command``) with ``train_overrides`` (train key -> value, only
    ``config.RESUMABLE_TRAIN_KEYS``) applied and validated; the trainer writes the result back to
    ``config.yaml``, so a later plain resume keeps a new length."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise VlcapError(f"{run_dir}: no config.yaml here; pass the --out directory of a {command} run")
    cfg = config_lib.from_dict(config_class, config_lib.load_yaml(path), where=str(path))
    overrides = dict(train_overrides or {})
    refused = sorted(set(overrides) - set(config_lib.RESUMABLE_TRAIN_KEYS))
    if refused:
        raise VlcapError(f"{run_dir}: a resumed run cannot change train.{', train.'.join(refused)}")
    return config_lib.from_dict(config_class, config_lib.merge(config_lib.to_dict(cfg), {"train": overrides}),
                                where=f"{path} with the command line's values")


def already_trained(run_dir, step, total_steps, train_cfg, length_changed, command="vlcap train"):
    """The error for resuming a run with nothing left to train: a finished run given no new
    length, or a new length that is not longer than the steps already taken."""
    if not length_changed:
        return VlcapError(f"{run_dir}: the run already finished ({step} of {total_steps} steps); nothing to "
                          f"resume; to train longer: {command} --resume {run_dir} --epochs N or --max-steps N")
    return VlcapError(f"{run_dir}: already at step {step} of {total_steps} (train.epochs={train_cfg.epochs}, "
                      f"train.max_steps={train_cfg.max_steps}); pass a longer --epochs and/or --max-steps")


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
