"""Experiment logging (``train.log``): the run's numbers as events a dashboard reads, beside
``history.jsonl`` (which is always written).

``none`` logs nothing more. ``tensorboard`` writes TensorBoard event files to ``RUN_DIR/tensorboard``
(``tensorboard --logdir RUN_DIR``), with the tags HF Trainer users know: per optimizer step
``train/loss`` (the epoch's running token-mean), ``train/learning_rate`` and
``train/samples_per_second``; per epoch ``train/epoch_loss``, ``train/epoch_seconds``,
``eval/loss`` and ``eval/NAME`` for each validation metric. The x axis is the optimizer step.
Only the main process logs; a resumed run appends a new event file to the same folder.
"""
from pathlib import Path

from vlcap.core.errors import VlcapError

LOGGERS = ("none", "tensorboard")
INSTALL_HINT = "pip install 'vlcap[tensorboard]' (or pip install tensorboard)"
# history record key -> TensorBoard tag; any other number (a validation metric) goes under eval/
EPOCH_TAGS = {"train_loss": "train/epoch_loss", "epoch_seconds": "train/epoch_seconds",
              "samples_per_s": "train/epoch_samples_per_second", "val_loss": "eval/loss",
              "val_seconds": "eval/seconds", "lr": None, "epoch": None, "step": None}


class NoLog:
    """``train.log=none``: the history file is the record."""

    def step(self, step, loss, lr, samples_per_s):
        pass

    def epoch(self, step, record):
        pass

    def close(self):
        pass


class TensorBoardLog(NoLog):
    def __init__(self, log_dir):
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package
        self.writer = SummaryWriter(str(log_dir))

    def step(self, step, loss, lr, samples_per_s):
        self.writer.add_scalar("train/loss", loss, step)
        self.writer.add_scalar("train/learning_rate", lr, step)
        self.writer.add_scalar("train/samples_per_second", samples_per_s, step)

    def epoch(self, step, record):
        for key, value in record.items():
            tag = EPOCH_TAGS.get(key, f"eval/{key}")
            if tag is not None and isinstance(value, (int, float)):
                self.writer.add_scalar(tag, value, step)
        self.writer.flush()  # an epoch's numbers are on disk even if the run is killed later

    def close(self):
        self.writer.close()


def check_log(kind):
    """Refuse an unknown ``train.log`` or a missing package before any training time is spent."""
    if kind not in LOGGERS:
        raise VlcapError(f"train.log={kind!r} is not a logger; choose one of {', '.join(LOGGERS)}")
    if kind == "tensorboard":
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise VlcapError(f"train.log=tensorboard needs the tensorboard package: {INSTALL_HINT}") from None


def open_log(kind, run_dir, enabled=True):
    """The logger ``train.log`` names (checked by ``check_log``); ``NoLog`` where not ``enabled``
    (processes other than the main one)."""
    check_log(kind)
    if kind == "none" or not enabled:
        return NoLog()
    return TensorBoardLog(Path(run_dir) / "tensorboard")
