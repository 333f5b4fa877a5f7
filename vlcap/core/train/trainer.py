"""The training loop. It knows no PEFT method, decoding strategy or metric by name: all three
come from the registry, chosen by the run config.

``train`` builds a ``Trainer`` (the captioning task) and runs it; ``TrainingLoop.run`` and
``TrainingLoop.train_epoch`` are the loop, shared with the ViT classifier
(``classifier.ClassifierTrainer``). Each concern the loop touches lives in one place:

- model and data (captioning): ``prepare_model``, ``configure_decoder``, ``make_loaders`` (``ValidationData``)
- optimizer, learning-rate schedule, gradient accumulation: ``build_optimizer``, ``build_scheduler``,
  ``Schedule``
- AMP and the loss scaler: ``MixedPrecision``
- DDP: ``distributed`` (process context, loss weights, gradient sync); ``Trainer.train_micro_batch``
  and the ``ctx.sum`` calls are where the loop meets it
- the numerical guard: ``NumericalGuard`` (non-finite loss, gradient norm, weights)
- validation and best-checkpoint selection: ``validation_loss``, ``validation_metrics``,
  ``selection_key``, ``Selection``
- checkpoint and history writing: ``Trainer.write_epoch``, ``write_history``
- resume state and stop signals: ``resume.TrainState``, ``resume.save_training``,
  ``resume.restore_training``, ``resume.stop_requests``
- progress display: ``TrainingDisplay``; experiment logging (``train.log``): ``experiment_log``
"""
import dataclasses
import functools
import json
import math
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import numpy as np
import torch
from rich.console import Console
from timm.scheduler import CosineLRScheduler
from torch.utils.data import DataLoader

from vlcap.core import config as config_lib
from vlcap.core.train import distributed
from vlcap.core.train import experiment_log
from vlcap.core.train import resume as resume_lib
from vlcap.core.atomic import atomic_write
from vlcap.core.model.captioner import CaptionLoss, build_captioner, check_context, tokenizer_for
from vlcap.core.model.checkpoint import init_trainable, save_checkpoint
from vlcap.core.data import check_images_exist, iterate_images, load_captions, unreadable_images
from vlcap.core.infer.decoding import caption_images
from vlcap.core.console import say
from vlcap.core.errors import VlcapError, VlcapWarning, few
from vlcap.core.eval.metrics import check_metric_runs, metric_config, run_metric
from vlcap.core.plugins import plugin_call
from vlcap.core.progress import progress_bar, progress_task
from vlcap.core.runtime import autocast, autocast_dtype, evaluating, resolve_device
from vlcap.core.train.datasets import CachedCaptionDataset, CaptionDataset, collate_captions
from vlcap.core.train.feature_cache import training_cache
from vlcap.core.model.course_weights import save_course_weights
from vlcap.core.model.peft import check_budget, count_parameters
from vlcap.core.model.tokenizer import IGNORE_INDEX


@dataclass
class TrainResult:
    run_dir: Path
    best_checkpoint: Path
    last_checkpoint: Path
    trainable: int
    saved: int
    steps: int
    history: list = field(default_factory=list)
    unreadable: list = field(default_factory=list)  # one message per image file that could not be read
    best: Optional[dict] = None  # the history record best_checkpoint was saved at


def train(cfg, run_dir, registry, console=None, resume=False, new_length=False, overwrite=False):
    """Train ``cfg`` into ``run_dir``, which the run holds (``resume.run_lock``) until it ends.
    With ``resume``, continue from ``run_dir``'s resume state (``cfg`` must be that run's config,
    see ``resume.resume_config``); ``new_length``: ``cfg`` gives the run a new train.epochs /
    train.max_steps, which must be longer than what it trained. A new run into a directory that
    holds another run's resume state is refused unless ``overwrite``."""
    with resume_lib.run_lock(run_dir):
        if not resume:
            resume_lib.refuse_replacing(run_dir, overwrite)
        return Trainer(cfg, run_dir, registry, console, resume, new_length).run()


# --- Model and data -------------------------------------------------------------------------

def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class PreparedModel(NamedTuple):
    tokenizer: object
    captioner: object
    method: object
    config: object  # the run's resolved config: plugin options filled in, the decoder weights' path


def prepare_model(cfg, registry, run_dir=None):
    """Tokenizer + captioner for a training run. With ``model.random_decoder`` and no weights
    file, the random decoder is written to ``run_dir/decoder_model.bin`` in the course format
    and its path recorded in the returned config, so every later command can load it."""
    tokenizer = tokenizer_for(cfg)
    weights = cfg.model.decoder_weights
    if weights is None and not cfg.model.random_decoder:
        raise VlcapError("no decoder weights: pass --decoder-weights PATH/decoder_model.bin "
                         "(or --preset tiny to run offline with a random decoder)")
    captioner, method, resolved = build_captioner(cfg, registry, decoder_weights=weights)
    if weights is None:
        path = (Path(run_dir) / "decoder_model.bin").resolve()
        save_course_weights(captioner.decoder, path)
        resolved = dataclasses.replace(resolved, model=dataclasses.replace(resolved.model, decoder_weights=str(path)))
    return PreparedModel(tokenizer, captioner, method, resolved)


def configure_decoder(captioner, cfg):
    """The decoder's throughput options: gradient checkpointing and ``torch.compile`` (in place,
    so parameter names and checkpoints stay the same)."""
    captioner.decoder.gradient_checkpointing = cfg.train.grad_checkpointing
    if cfg.train.compile:
        captioner.decoder.compile(backend="inductor" if cfg.train.compile is True else cfg.train.compile)


class ValidationData(NamedTuple):
    loss_batches: DataLoader  # every validation caption, batched as in training, for the validation loss
    images: Callable  # () -> batches of the images captioned for metrics (``data.iterate_images``)
    references: dict  # stem -> reference captions, for every image listed with at least one
    paths: dict  # stem -> path of each image captioned for metrics (at most train.max_val_images)


def caption_dataset(json_path, image_dir, transform, tokenizer, max_tokens):
    """The caption file's ``CaptionSet`` and its ``CaptionDataset``; every listed image must exist."""
    captions = load_captions(json_path)
    check_images_exist(captions, image_dir, json_path)
    return captions, CaptionDataset(captions, image_dir, transform, tokenizer, max_tokens)


def make_loaders(cfg, captioner, tokenizer, device, ctx=distributed.Context(), cache=None):
    """``(training DataLoader, ValidationData or None)``. With ``cache`` the training set reads
    the cached encoder tokens instead of the images."""
    if not cfg.data.train_json or not cfg.data.train_images:
        raise VlcapError("no training data: pass --train-json FILE and --train-images DIR")
    transform = captioner.encoder.transform()
    loader_args = dict(batch_size=distributed.per_rank_batch(cfg.train.batch_size, ctx), num_workers=cfg.train.num_workers,
                       pin_memory=device.type == "cuda", worker_init_fn=resume_lib.ignore_interrupts_in_worker,
                       collate_fn=functools.partial(collate_captions, pad_id=tokenizer.eot_id))
    train_captions, train_set = caption_dataset(cfg.data.train_json, cfg.data.train_images, transform, tokenizer,
                                                cfg.data.max_caption_tokens)
    if not len(train_set):
        raise VlcapError(f"{cfg.data.train_json}: no non-empty captions to train on")
    if cache is not None:
        cache.check_images(set(train_captions.images.values()), cfg.data.train_images, cfg.data.train_json)
        train_set = CachedCaptionDataset(train_set, cache)
    train_loader = training_loader(train_set, loader_args, ctx, cfg.train)
    val = None
    if cfg.data.val_json and cfg.data.val_images:
        val = validation_data(cfg, transform, tokenizer, device, loader_args)
    return train_loader, val


def training_loader(train_set, loader_args, ctx, train_cfg):
    """The order is a function of (seed, epoch) alone, so a resumed run rebuilds it and N processes
    see the batches one process would; the loader's own generator only seeds workers and keeps
    the global RNG (dropout) untouched."""
    sampler, batch_sampler = distributed.train_sampler(train_set, loader_args["batch_size"], ctx, train_cfg.seed,
                                                       train_cfg.length_buckets)
    generator = torch.Generator().manual_seed(train_cfg.seed)
    if batch_sampler is None:
        return DataLoader(train_set, sampler=sampler, generator=generator, **loader_args)
    return DataLoader(train_set, batch_sampler=batch_sampler, generator=generator,
                      **{k: v for k, v in loader_args.items() if k != "batch_size"})


def check_validation_images(captions, image_dir, json_path):
    """Before training, not after the first epoch: validation with no readable image is one line;
    some unreadable ones are a warning naming them (validation skips them, as training does)."""
    names = sorted(set(captions.images.values()))
    bad = unreadable_images([Path(image_dir) / name for name in names])
    if bad and len(bad) == len(names):
        raise VlcapError(f"{json_path}: none of its {len(names)} validation image(s) in {image_dir} can be read "
                         f"({next(iter(bad.values()))}); fix them or leave out --val-json")
    if bad:
        warnings.warn(f"{len(bad)} of {len(names)} validation image(s) cannot be read and are left out of "
                      f"validation: {few(sorted(p.name for p in bad), 3)}", VlcapWarning, stacklevel=2)


def validation_data(cfg, transform, tokenizer, device, loader_args):
    """The validation set. Images listed without captions cannot be scored: the validation loss
    has nothing of theirs, and metrics caption only images with references."""
    val_captions, val_set = caption_dataset(cfg.data.val_json, cfg.data.val_images, transform, tokenizer,
                                            cfg.data.max_caption_tokens)
    check_validation_images(val_captions, cfg.data.val_images, cfg.data.val_json)
    references = val_captions.references()
    names = sorted(n for n in set(val_captions.images.values()) if Path(n).stem in references)
    image_paths = [Path(cfg.data.val_images) / name for name in names[:cfg.train.max_val_images]]
    images = functools.partial(iterate_images, image_paths, transform, cfg.train.batch_size, device,
                               num_workers=cfg.train.num_workers,
                               worker_init_fn=resume_lib.ignore_interrupts_in_worker)
    return ValidationData(DataLoader(val_set, shuffle=False, **loader_args), images, references,
                          {p.stem: p for p in image_paths})


# --- Optimizer, schedule and gradient accumulation -------------------------------------------

def build_optimizer(trainable, train_cfg):
    """AdamW over the trainable parameters; no weight decay on biases, LayerNorm and prefix
    vectors (the GPT-2 / nanoGPT convention). Fused on CPU too: one kernel updates every tensor
    instead of a Python loop over them, which dominates the step with many small PEFT tensors
    (it is also HF Trainer's default)."""
    return torch.optim.AdamW(
        [{"params": [p for p in trainable if p.dim() >= 2], "weight_decay": train_cfg.weight_decay},
         {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0}],
        lr=train_cfg.lr, fused=True)


def build_scheduler(optimizer, total_steps, train_cfg):
    """Linear warm-up from 1% of ``train.lr``, then cosine decay to ``lr * min_lr_ratio`` at the
    last step; updated per optimizer step (``step_update``), so a resumed run continues it."""
    return CosineLRScheduler(optimizer, t_initial=max(total_steps, 1), lr_min=train_cfg.lr * train_cfg.min_lr_ratio,
                             warmup_t=min(train_cfg.warmup_steps, max(total_steps - 1, 0)),
                             warmup_lr_init=train_cfg.lr * 0.01, t_in_epochs=False)


@dataclass(frozen=True)
class Schedule:
    """The run's length and its gradient accumulation: ``grad_accum`` micro-batches make one
    optimizer step (an epoch's last step may take fewer), and the run ends after ``total_steps``
    steps (``train.max_steps``) or ``train.epochs`` epochs, whichever comes first."""
    grad_accum: int
    batches_per_epoch: int
    total_steps: int
    epochs: int  # of a run trained from the start (``final_epoch`` counts from where a run stands)

    @classmethod
    def plan(cls, batches_per_epoch, train_cfg):
        steps_per_epoch = steps_in(batches_per_epoch, train_cfg.grad_accum)
        total_steps = train_cfg.epochs * steps_per_epoch
        if train_cfg.max_steps is not None:
            total_steps = min(total_steps, train_cfg.max_steps)
        return cls(train_cfg.grad_accum, batches_per_epoch, total_steps, math.ceil(total_steps / steps_per_epoch))

    @property
    def steps_per_epoch(self):
        return steps_in(self.batches_per_epoch, self.grad_accum)

    def final_epoch(self, epoch, batches, step):
        """How many epochs the history holds when a run at ``step`` (``batches`` into 0-based
        ``epoch``) ends: ``epochs`` from the start, more after an epoch cut short by max_steps and
        extended (the cut epoch stays closed; the extension starts the next one)."""
        taken_this_epoch = sum(self.steps_after(i) for i in range(batches))
        return epoch + math.ceil(max(self.total_steps - step + taken_this_epoch, 0) / self.steps_per_epoch)

    def steps_after(self, batch):
        """Whether the optimizer steps after micro-batch ``batch`` (0-based, within its epoch)."""
        return (batch + 1) % self.grad_accum == 0 or batch + 1 == self.batches_per_epoch

    def micro_loss(self, loss, weight):
        """What a micro-batch back-propagates: its loss with its process's DDP weight, as one
        ``grad_accum``-th of the step, so the accumulated gradient is the mean over the step."""
        return loss * weight / self.grad_accum


def steps_in(batches, grad_accum):
    """Optimizer steps in an epoch of ``batches`` micro-batches (its last step may take fewer)."""
    return math.ceil(batches / grad_accum)


# --- AMP and the loss scaler -----------------------------------------------------------------

class MixedPrecision:
    """Autocast per ``train.amp`` (``runtime.autocast_dtype``; None: full precision) and the loss
    scaler. Only fp16 scales: the loss is multiplied before backward so small gradients do not
    flush to zero, and a step whose gradients overflowed is skipped (the scale lowered instead)."""

    def __init__(self, amp, device):
        self.device = device
        self.dtype = autocast_dtype(amp, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)

    @property
    def skips_overflowing_steps(self):
        return self.scaler.is_enabled()

    def autocast(self):
        return autocast(self.device, self.dtype)

    def backward(self, loss):
        self.scaler.scale(loss).backward()

    def unscale(self, optimizer):
        """Bring the gradients back to their true size (before clipping them)."""
        self.scaler.unscale_(optimizer)

    def step(self, optimizer):
        self.scaler.step(optimizer)
        self.scaler.update()


# --- The numerical guard ---------------------------------------------------------------------

class NonFinite(VlcapError):
    """A NaN/inf loss, gradient or weight stopped the run; the last good state was kept."""


def check_finite(named_parameters, step, what):
    """Refuse to write non-finite weights over the last good state."""
    bad = [name for name, p in named_parameters if not torch.isfinite(p).all()]
    if bad:
        raise NonFinite(f"parameters became non-finite ({few(bad)}) after step {step}; {what}")


class NumericalGuard:
    """Stops the run at the first NaN/inf loss or gradient norm, naming the step and batch, and
    keeps non-finite weights from overwriting the last good resume state or checkpoint."""

    def __init__(self, state_file, ctx, amp, lr, command="vlcap train"):
        self.state_file, self.ctx, self.amp, self.lr, self.command = state_file, ctx, amp, lr, command

    def last_good(self):
        """Where the last good state is and what to do: a command that works (a resumed run may
        lower its learning rate), or starting again lower when nothing was saved yet."""
        lower = f"{self.lr / 10:g}"
        if not self.state_file.exists():
            return f"no state was saved yet; start again with a lower train.lr (e.g. --lr {lower})"
        run_dir = self.state_file.parent.parent
        return (f"the last good state is {self.state_file}; continue with a lower learning rate: "
                f"{self.command} --resume {run_dir} --lr {lower}")

    def check_loss(self, loss, where):
        # Under DDP a non-finite loss stops every process at the gradient-norm check instead (the
        # gradients are all-reduced): one process stopping alone would strand the others.
        if not self.ctx.enabled and not torch.isfinite(loss):
            raise NonFinite(f"loss became {loss.item()} at {where}; {self.last_good()}"
                            f"{'' if self.amp.dtype is None else ' (or start again with train.amp=off)'}")

    def check_gradient_norm(self, norm, where):
        if not self.amp.skips_overflowing_steps and not torch.isfinite(norm):  # fp16's scaler skips such steps
            raise NonFinite(f"gradient norm became {float(norm)} at {where}; {self.last_good()}")

    def check_weights(self, named_parameters, step):
        """Before a checkpoint is written."""
        check_finite(named_parameters, step, self.last_good())

    def check_weights_before_state_save(self, named_parameters, step):
        check_finite(named_parameters, step, f"the last good state stays in {self.state_file}")


# --- Validation and best-checkpoint selection ------------------------------------------------

@torch.no_grad()
def validation_loss(captioner, loader, device, dtype, unreadable):
    """Token-weighted mean loss over the validation captions; unreadable images go to ``unreadable``."""
    total, count = 0.0, 0
    for pixels, input_ids, labels, skipped in loader:
        unreadable.update(skipped)
        if pixels is None:
            continue
        with autocast(device, dtype):
            loss = captioner.loss(pixels.to(device), input_ids.to(device), labels.to(device))
        n = int((labels != IGNORE_INDEX).sum())
        total, count = total + float(loss) * n, count + n
    return total / max(count, 1)


@torch.no_grad()
def validation_captions(captioner, val, tokenizer, decoding_cfg, strategy, device, dtype, unreadable, progress=None):
    """stem -> generated caption for every readable image in ``val.paths``, shown as a
    "validate" task on ``progress``."""
    stems, predictions = list(val.paths), {}
    with progress_task(progress, "validate", len(stems)) as advance:
        for pixels, indices, skipped in val.images():
            unreadable.update(item.message for item in skipped)
            if pixels is not None:
                with autocast(device, dtype):
                    captions = caption_images(captioner, pixels, tokenizer, strategy,
                                              decoding_cfg.options, decoding_cfg.max_length)
                predictions.update(zip((stems[i] for i in indices), captions))
            advance(len(indices) + len(skipped))
    return predictions


def validation_metrics(captioner, val, tokenizer, cfg, registry, device, dtype, unreadable, progress=None):
    """Each metric in ``train.metrics`` on the validation images' generated captions."""
    if not cfg.train.metrics:
        return {}
    strategy = registry.get("decoding", cfg.decoding.strategy)
    predictions = validation_captions(captioner, val, tokenizer, cfg.decoding, strategy, device, dtype,
                                      unreadable, progress)
    if not predictions:
        raise VlcapError(f"no validation image could be read: {few(sorted(unreadable), 2)}")
    references = {stem: val.references[stem] for stem in predictions}
    scores = {}
    for name in cfg.train.metrics:
        metric, config = metric_and_config(cfg, registry, name)
        result = run_metric(metric, config, predictions, references, val.paths)
        for note in result.notes:
            warnings.warn(note, VlcapWarning, stacklevel=2)
        scores[name] = result.score
    return scores


def metric_and_config(cfg, registry, name):
    """A metric of ``train.metrics`` and its config from ``train.metric_options``."""
    metric = registry.get("metric", name)
    return metric, metric_config(metric, cfg.train.metric_options.get(name), f"train.metric_options.{name}")


def best_metric_name(train_cfg, has_val):
    """The history key ``train.best_metric`` names; ``auto``: the first of ``train.metrics`` with a
    validation set, else the validation loss, else the training loss."""
    choice = train_cfg.best_metric
    if choice == "auto":
        names = train_cfg.metrics
        choice = names[0] if names and has_val else ("val_loss" if has_val else "train_loss")
    return choice


def selection_key(cfg, registry, has_val):
    """(name, higher_is_better) of the number that picks the best checkpoint. Also checks, before
    any training time is spent, that each metric in ``train.metrics`` is installed and can run."""
    names = cfg.train.metrics
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise VlcapError(f"train.metrics must be a list of metric names, e.g. --set train.metrics=[cider], got {names!r}")
    options = cfg.train.metric_options
    if not isinstance(options, dict) or not all(isinstance(v, dict) for v in options.values()):
        raise VlcapError("train.metric_options must map metric names to their options, e.g. "
                         f"--set train.metric_options.clipscore.batch_size=32, got {options!r}")
    unused = sorted(set(options) - set(names))
    if unused:
        raise VlcapError(f"train.metric_options names {', '.join(unused)}, not in train.metrics (now {names})")
    metrics = {name: metric_and_config(cfg, registry, name) for name in names}
    for name, (metric, config) in metrics.items() if has_val else ():
        try:
            check_metric_runs(metric, config)
        except VlcapError as exc:
            raise VlcapError(f"{exc} (or leave {name} out of train.metrics, e.g. --set train.metrics=[])") from None
    choice = best_metric_name(cfg.train, has_val)
    if choice in ("val_loss", "train_loss"):
        if choice == "val_loss" and not has_val:
            raise VlcapError("train.best_metric=val_loss needs --val-json and --val-images")
        return choice, False
    metric = registry.get("metric", choice)
    if choice not in metrics or not has_val:
        raise VlcapError(f"train.best_metric={choice} is not computed: it needs --val-json/--val-images and "
                         f"{choice} in train.metrics (now {names})")
    return choice, metric.higher_is_better


class Selection(NamedTuple):
    """Which epoch's weights best.safetensors holds: the one with the best ``record[key]`` so far
    (on a tie, the earlier one)."""
    key: str
    higher_is_better: bool

    def improves(self, record, best_value):
        value = record[self.key]
        return best_value is None or (value > best_value if self.higher_is_better else value < best_value)


# --- History and progress display ------------------------------------------------------------

# The history keys that measure time (``vlcap compare`` reads them); a resumed run's history
# equals an uninterrupted one's apart from these.
TIMING_KEYS = ("epoch_seconds", "samples_per_s", "val_seconds")


def timing_record(seconds, images, lr):
    """The epoch's timing for its history record: ``epoch_seconds`` of training (for the epoch a run
    resumed in: since it resumed; validation is ``val_seconds``), ``samples_per_s`` (images trained
    on by every process per second) and the learning rate at its end."""
    return {"lr": lr, "epoch_seconds": round(seconds, 3), "samples_per_s": round(images / seconds, 3)}


def write_history(run_dir, history):
    """The whole history, atomically: a kill never leaves half a line, a resume never repeats one."""
    with atomic_write(Path(run_dir) / "history.jsonl", "w") as f:
        f.writelines(json.dumps(record) + "\n" for record in history)


class TrainingDisplay:
    """The live progress bar (disabled except on rank 0): steps done, the epoch, its running loss,
    the learning rate and images/s since the epoch (or the resumed part of it) started."""

    def __init__(self, console, enabled, total_steps, step):
        self.progress = progress_bar(console=console, stats=True, disable=not enabled)
        self.total_steps, self.step = total_steps, step
        self.started, self.seen_at_start = time.perf_counter(), 0

    def __enter__(self):
        self.progress.__enter__()
        self.task = self.progress.add_task("train", total=self.total_steps, completed=self.step, stats="")
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def epoch_started(self, seen):
        self.started, self.seen_at_start = time.perf_counter(), seen

    def seconds(self):
        """Since the epoch (or the resumed part of it) started."""
        return max(time.perf_counter() - self.started, 1e-9)

    def step_done(self, epoch, epochs, loss, lr, rate):
        """``rate``: images/s trained on (by every process) since ``epoch_started``."""
        self.progress.update(self.task, advance=1, description=f"epoch {epoch + 1}/{epochs}",
                             stats=f"loss {loss:.3f}  lr {lr:.2e}  {rate:.1f} img/s")

    def print_record(self, record):
        say(self.progress.console, "  ".join(f"{k} {record_value(k, v)}" for k, v in record.items()))


def record_value(key, value):
    """A history value as the epoch line shows it: the learning rate in scientific notation (a
    schedule's small values would round to 0.0001), timings to a tenth, scores to 4 decimals."""
    if not isinstance(value, float):
        return str(value)
    if key == "lr":
        return f"{value:.2e}"
    return f"{value:.1f}" if key.endswith(("_seconds", "_per_s")) else f"{value:.4f}"


# --- The trainer -----------------------------------------------------------------------------

class TrainingLoop:
    """The mechanics every vlcap training run shares, whatever it trains: a run directory,
    seeding, DDP, AMP, the schedule and gradient accumulation, the numerical guard, the epoch
    loop with its progress display, validation and best-checkpoint selection, atomic checkpoint
    and history writes, and resume state and stop signals. A task (``Trainer``: captioning;
    ``classifier.ClassifierTrainer``) subclasses it and defines ``build``, ``train_micro_batch``,
    ``validate``, ``save_checkpoint`` and ``result``.

    ``__init__`` builds (or, resuming, restores) everything, ``run`` trains. The run config is
    read-only; what building computes is in ``self.cfg``, which ``config.yaml`` records."""

    command = "vlcap train"  # what continues a stopped run (in its messages)

    def __init__(self, cfg, run_dir, console=None, resume=False, new_length=False):
        console = console or Console(stderr=True)
        experiment_log.check_log(cfg.train.log)  # before any time is spent
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.state_file = resume_lib.state_path(self.run_dir)
        saved = resume_lib.load_state(self.run_dir) if resume else None
        cfg = config_lib.absolute_paths(cfg)  # config.yaml and the checkpoints work from any directory
        seed_everything(cfg.train.seed)
        self.ctx, self.device = distributed.init(resolve_device(cfg.train.device))
        # Rank 0 alone logs, shows progress and writes the run directory.
        self.console = console if self.ctx.is_main else Console(quiet=True)
        self.amp = MixedPrecision(cfg.train.amp, self.device)
        self.guard = NumericalGuard(self.state_file, self.ctx, self.amp, cfg.train.lr, self.command)
        self.build(cfg, initialise=saved is None)
        self.build_optimizer()
        self.resumed = saved is not None
        self.state = self.restore(saved, new_length) if self.resumed else resume_lib.TrainState()
        if self.ctx.is_main:  # after restore: a refused resume leaves config.yaml as it was
            with atomic_write(self.run_dir / "config.yaml", "w") as f:
                f.write(config_lib.dump_yaml(self.cfg))
        self.best_path, self.last_path = self.run_dir / "best.safetensors", self.run_dir / "last.safetensors"
        self.saved = 0  # parameters in the last checkpoint written
        self.display = TrainingDisplay(self.console, self.ctx.is_main, self.schedule.total_steps, self.state.step)
        self.log = experiment_log.open_log(self.cfg.train.log, self.run_dir, self.ctx.is_main)
        self.final_epoch = self.schedule.final_epoch(self.state.epoch, self.state.batches, self.state.step)

    # What a task defines: its model, data, step and checkpoint.

    def build(self, cfg, initialise):
        """Set ``self.cfg`` (the resolved config), ``self.model`` (whose parameters with
        ``requires_grad`` train), ``self.step_model`` (the loss module, DDP-wrapped),
        ``self.train_loader`` (batches in ``distributed.train_sampler`` order), ``self.val``
        (None: no validation) and ``self.selection``. ``initialise``: a new run, not a resumed one."""
        raise NotImplementedError

    def train_micro_batch(self, batch, steps_now, where):
        """Forward and backward of one micro-batch; adds to ``self.state``'s running counters."""
        raise NotImplementedError

    def validate(self):
        """The validation scores of the epoch's record (only called when ``self.val`` is set)."""
        raise NotImplementedError

    def save_checkpoint(self, path, record):
        """Write the trainable weights to ``path``; returns the parameters saved."""
        raise NotImplementedError

    def announce(self):
        pass

    def report_skipped(self):
        pass

    def result(self):
        raise NotImplementedError

    def make_optimizer(self):
        return build_optimizer(self.trainable, self.cfg.train)

    def build_optimizer(self):
        self.named_trainable = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.trainable = [p for _, p in self.named_trainable]
        self.optimizer = self.make_optimizer()
        self.schedule = Schedule.plan(len(self.train_loader), self.cfg.train)
        self.scheduler = build_scheduler(self.optimizer, self.schedule.total_steps, self.cfg.train)

    def restore(self, saved, new_length):
        """The stopped run's weights, optimizer, scaler, random state and counters; the learning
        rate of its step on this run's schedule (re-planned over a new length)."""
        state = resume_lib.restore_training(saved, self.model, self.optimizer, self.scheduler, self.amp.scaler,
                                            self.state_file)
        if state.step >= self.schedule.total_steps and not state.batches:  # its last epoch ended and was saved
            raise resume_lib.already_trained(self.run_dir, state.step, self.schedule.total_steps, self.cfg.train,
                                             new_length, self.command)
        return state

    def run(self):
        self.announce()
        with self.display, resume_lib.stop_requests() as self.stop_signals:
            try:
                # Every epoch advances; a new one takes a step. An epoch whose steps are all taken but
                # which has not ended (stopped or killed during its validation or saving) only ends.
                while self.state.step < self.schedule.total_steps or self.state.batches:
                    epoch = self.state.epoch
                    if self.state.step < self.schedule.total_steps:
                        self.train_epoch(epoch)
                    self.end_epoch(epoch)
            finally:
                self.log.close()
        distributed.cleanup(self.ctx)
        self.report_skipped()
        return self.result()

    def train_epoch(self, epoch):
        """One pass over the training data (a resumed epoch from where it stopped), stepping the
        optimizer every ``grad_accum`` micro-batches; saves the resume state every
        ``train.save_every`` steps and stops, saved, when asked to by a signal."""
        state = self.state
        self.model.train()
        distributed.set_epoch(self.train_loader, epoch, state.batches)
        self.display.epoch_started(state.seen)
        for i, batch in enumerate(self.train_loader, start=state.batches):
            state.unreadable.update(batch.unreadable)
            where = f"step {state.step + 1} (epoch {epoch + 1}, batch {i + 1})"
            steps_now = self.schedule.steps_after(i)
            self.train_micro_batch(batch, steps_now, where)
            state.batches = i + 1
            if not steps_now:
                continue
            self.optimizer_step(where)
            self.show_step(epoch)
            if self.ctx.is_main and (self.stop_signals or state.step % self.cfg.train.save_every == 0):
                self.save_resume_state()
            if self.stop_signals:
                raise resume_lib.stopped(self.stop_signals[0], state.step, self.schedule.total_steps, self.run_dir,
                                         self.command)
            if state.step >= self.schedule.total_steps:
                break
        if state.seen == 0:
            raise VlcapError(f"no training image could be read in epoch {epoch + 1}: "
                             f"{few(sorted(state.unreadable), 2)}")

    def optimizer_step(self, where):
        self.amp.unscale(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.trainable, self.cfg.train.clip_grad)
        self.guard.check_gradient_norm(norm, where)
        self.amp.step(self.optimizer)
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        self.scheduler.step_update(self.state.step)

    def show_step(self, epoch):
        state = self.state
        loss_sum, images, token_sum = self.ctx.sum(state.running, state.seen - self.display.seen_at_start,
                                                   state.tokens)  # over all processes
        loss, lr, rate = loss_sum / max(token_sum, 1), self.optimizer.param_groups[0]["lr"], images / self.display.seconds()
        self.display.step_done(epoch, self.final_epoch, loss, lr, rate)
        self.log.step(state.step, loss, lr, rate)

    def end_epoch(self, epoch):
        """The epoch's record; rank 0 validates and writes the checkpoints, history and resume
        state while the other processes wait."""
        loss_sum, token_sum, images = self.ctx.sum(self.state.running, self.state.tokens,
                                                   self.state.seen - self.display.seen_at_start)
        seconds = self.display.seconds()
        record = {"epoch": epoch + 1, "step": self.state.step, "train_loss": loss_sum / max(token_sum, 1),
                  **timing_record(seconds, images, self.optimizer.param_groups[0]["lr"])}
        self.state.history.append(record)
        self.state.next_epoch()
        if self.ctx.is_main:
            if self.val is not None:
                started = time.perf_counter()
                record.update(self.validate())
                record["val_seconds"] = round(time.perf_counter() - started, 3)
            self.write_epoch(record)
            self.log.epoch(self.state.step, record)
            self.display.print_record(record)
        self.ctx.barrier()
        if self.stop_signals:
            raise resume_lib.stopped(self.stop_signals[0], self.state.step, self.schedule.total_steps, self.run_dir,
                                     self.command)

    def write_epoch(self, record):
        """last.safetensors, best.safetensors when ``record`` is the best so far, the history and
        the resume state, in that order, and never from non-finite weights."""
        self.guard.check_weights(self.named_trainable, self.state.step)
        self.saved = self.save_checkpoint(self.last_path, record)
        if self.selection.improves(record, self.state.best_value):
            self.state.best_value = record[self.selection.key]
            self.save_checkpoint(self.best_path, record)
        write_history(self.run_dir, self.state.history)
        self.save_resume_state()

    def save_resume_state(self):
        self.guard.check_weights_before_state_save(self.named_trainable, self.state.step)
        resume_lib.save_training(self.run_dir, self.state, self.named_trainable, self.optimizer, self.scheduler,
                                 self.amp.scaler)


class Trainer(TrainingLoop):
    """One captioning run (``TrainingLoop`` with the captioner, its caption data and metrics).

    What building computes (the PEFT method's resolved options, the
    decoder weights written for a random decoder, the feature cache used) is in ``self.cfg``, a new
    config, which is what ``config.yaml`` and the checkpoints record."""

    def __init__(self, cfg, run_dir, registry, console=None, resume=False, new_length=False):
        self.registry = registry
        super().__init__(cfg, run_dir, console, resume, new_length)

    def build(self, cfg, initialise):
        self.build_model_and_data(cfg, initialise)
        self.selection = Selection(*selection_key(self.cfg, self.registry, self.val is not None))
        self.warn_about_captions()

    def build_model_and_data(self, cfg, initialise=True):
        """``initialise``: a new run, whose trainable weights come from ``train.init_from`` when
        set (a resumed run's come from its resume state)."""
        self.tokenizer, self.captioner, self.method, cfg = prepare_model(cfg, self.registry, self.run_dir)
        if initialise and cfg.train.init_from:
            cfg = self.init_from_checkpoint(cfg)
        self.trainable_count = count_parameters(self.captioner).trainable
        check_budget(self.trainable_count)
        # A training pair runs max_caption_tokens + 1 positions; decoding for metrics max_length.
        check_context(self.captioner, "data.max_caption_tokens", cfg.data.max_caption_tokens, extra=1)
        check_context(self.captioner, "decoding.max_length", cfg.decoding.max_length)
        self.captioner.to(self.device)
        self.model = self.captioner
        self.cache = training_cache(cfg, self.captioner.encoder, self.run_dir, self.console, self.ctx.is_main,
                                    self.ctx.barrier)
        if self.cache is not None:  # the run records the cache it trained from
            cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, feature_cache=str(self.cache.path)))
        self.cfg = cfg
        self.train_loader, self.val = make_loaders(cfg, self.captioner, self.tokenizer, self.device, self.ctx,
                                                   self.cache)
        configure_decoder(self.captioner, cfg)
        # DDP wraps the loss module: its forward is what synchronises gradients.
        self.step_model = distributed.wrap(CaptionLoss(self.captioner, from_features=self.cache is not None),
                                           self.ctx, self.device)

    def init_from_checkpoint(self, cfg):
        """Fill the freshly built trainable parameters from ``train.init_from`` (checked by
        ``checkpoint.init_trainable``); the config records the checkpoint's absolute path."""
        init_trainable(cfg.train.init_from, self.captioner, cfg, self.tokenizer, self.registry)
        path = str(Path(cfg.train.init_from).resolve())
        return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, init_from=path))

    def warn_about_captions(self):
        dataset = self.train_loader.dataset
        if dataset.truncated:
            say(self.console, f"{dataset.truncated} training caption(s) longer than "
                f"{self.cfg.data.max_caption_tokens} tokens were truncated", "yellow")
        if dataset.empty:
            say(self.console, f"{dataset.empty} empty training caption(s) were left out", "yellow")

    def train_micro_batch(self, batch, steps_now, where):
        """Forward and backward of one micro-batch, adding to the step's gradient. Under DDP the
        processes all-reduce the gradients only with the step's last micro-batch."""
        weight = distributed.loss_weight(None if batch.pixels is None else batch.labels, self.ctx)
        self.state.skipped_batches += weight is None and self.ctx.enabled  # counted alike by every process
        if weight is None:
            return
        device = self.device
        pixels, input_ids, labels = batch.pixels.to(device), batch.input_ids.to(device), batch.labels.to(device)
        with distributed.sync_gradients(self.step_model, self.ctx, steps_now):
            with self.amp.autocast():
                loss = self.step_model(pixels, input_ids, labels)
            self.guard.check_loss(loss, where)
            self.amp.backward(self.schedule.micro_loss(loss, weight))
        # Token-weighted, like the validation loss: the same number with any process count.
        n = int((labels != IGNORE_INDEX).sum())
        self.state.running += loss.item() * n
        self.state.seen += len(pixels)
        self.state.tokens += n

    def validate(self):
        """``val_loss`` and each metric in ``train.metrics``, in eval mode."""
        dtype, unreadable = self.amp.dtype, self.state.unreadable
        with evaluating(self.captioner):
            scores = {"val_loss": validation_loss(self.captioner, self.val.loss_batches, self.device, dtype,
                                                  unreadable)}
            scores.update(validation_metrics(self.captioner, self.val, self.tokenizer, self.cfg, self.registry,
                                             self.device, dtype, unreadable, self.display.progress))
        return scores

    def save_checkpoint(self, path, record):
        return save_checkpoint(path, self.captioner, self.method, self.cfg, self.tokenizer, self.registry, record)

    def announce(self):
        processes = f" x {self.ctx.world_size} processes" if self.ctx.enabled else ""
        resumed = f" (resumed at step {self.state.step})" if self.resumed else ""
        if not self.resumed and self.cfg.train.init_from:
            resumed = f" (starting from {self.cfg.train.init_from})"
        cache = f" (from feature cache {self.cache.path})" if self.cache else ""
        say(self.console, f"vlcap train {self.cfg.connector.name} + {self.cfg.peft.method} on {self.device}{processes}: "
            f"{self.trainable_count:,} trainable parameters, {len(self.train_loader.dataset):,} "
            f"captions, {self.schedule.total_steps} steps{resumed} -> {self.run_dir}{cache}")

    def report_skipped(self):
        unreadable, skipped = sorted(self.state.unreadable), self.state.skipped_batches
        if unreadable:
            say(self.console, f"{len(unreadable)} unreadable image(s) were skipped: {few(unreadable, 3)}", "yellow")
        if skipped:
            say(self.console, f"{skipped} batch(es) were skipped by every process: a process had no "
                "readable image in its share of them", "yellow")

    def result(self):
        state = self.state
        best = next((r for r in state.history if r.get(self.selection.key) == state.best_value), None)
        return TrainResult(self.run_dir, self.best_path, self.last_path, self.trainable_count, self.saved,
                           state.step, state.history, sorted(state.unreadable), best)
