"""Fine-tuning a timm ViT as an image classifier on folders of labelled images.

The run is a ``trainer.TrainingLoop`` like captioning (AMP, DDP, gradient accumulation, the
numerical guard, atomic checkpoints, resume, progress): this module only says what the model,
the data, a step and validation are. Images are named ``{class}_{n}.ext`` (the class is the name
up to its last underscore), or a ``filename,label`` CSV labels them. Classes are sorted (as
numbers when they all are), and head output ``i`` is class ``i`` of that order, which the
checkpoint records by name. Validation reports ``val_loss`` and ``val_accuracy`` each epoch;
best.safetensors holds the epoch of the highest accuracy (without validation: the lowest
training loss). With ``train.optimizer=sam`` every step takes two forward/backward passes
(``sam.SAM``).
"""
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from vlcap.core.config import CLASSIFIER_OPTIMIZERS, ClassifierConfig
from vlcap.core.console import say
from vlcap.core.data import Unreadable, find_images, load_image, read_filename_label_csv, split_unreadable
from vlcap.core.errors import VlcapError, few
from vlcap.core.model.classifier import ViTClassifier, save_classifier
from vlcap.core.runtime import autocast, evaluating
from vlcap.core.train import distributed
from vlcap.core.train import resume as resume_lib
from vlcap.core.train.sam import SAM
from vlcap.core.train.trainer import Selection, TrainingLoop, build_optimizer

CLASS_IN_NAME = re.compile(r"^(.+)_\d+$")  # {class}_{n}: the class is all before the last _<digits>
COMMAND = "vlcap train-classifier"


# --- Labelled images -------------------------------------------------------------------------

def read_labels_csv(path):
    """file name -> class from a ``filename,label`` CSV (the course's val_gt.csv form)."""
    return {name: label for _, name, label in read_filename_label_csv(path)}


def labelled_images(folder, labels=None):
    """``[(path, class name)]`` for every image in ``folder``: from ``labels`` (file name ->
    class) when given, else from the ``{class}_{n}.ext`` names."""
    paths = find_images(folder)
    if labels is not None:
        missing = [p.name for p in paths if p.name not in labels]
        if missing:
            raise VlcapError(f"the labels file has no row for {len(missing)} image(s) in {folder}: {few(missing)}")
        return [(p, labels[p.name]) for p in paths]
    unnamed = [p.name for p in paths if not CLASS_IN_NAME.match(p.stem)]
    if unnamed:
        raise VlcapError(f"{folder}: cannot read the class of {few(unnamed)} (expected {{class}}_{{n}}.ext, "
                         "e.g. 3_17.png); rename them or pass --labels filename,label.csv")
    return [(p, CLASS_IN_NAME.match(p.stem).group(1)) for p in paths]


def class_order(names):
    """The classes sorted: as numbers when every name is an integer ("2" before "10")."""
    names = set(names)
    if all(re.fullmatch(r"-?\d+", n) for n in names):
        return sorted(names, key=int)
    return sorted(names)


class LabelledDataset(Dataset):
    """``(pixels, class index)`` per image, or ``Unreadable`` (training goes on without it)."""

    def __init__(self, items, classes, transform):
        index = {name: i for i, name in enumerate(classes)}
        self.items = [(path, index[name]) for path, name in items]
        self.transform = transform

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        path, label = self.items[i]
        try:
            return self.transform(load_image(path)), label
        except VlcapError as exc:  # returned, not raised: a DataLoader worker would wrap it in a traceback
            return Unreadable(path, str(exc))


class LabelledBatch(NamedTuple):
    pixels: Optional[torch.Tensor]  # None when no image of the batch was readable
    labels: Optional[torch.Tensor]
    unreadable: tuple  # one message per dropped image


def collate_labelled(batch):
    batch, unreadable = split_unreadable(batch)
    messages = tuple(item.message for item in unreadable)
    if not batch:
        return LabelledBatch(None, None, messages)
    pixels, labels = zip(*batch)
    return LabelledBatch(torch.stack(pixels), torch.tensor(labels), messages)


class LabelledItems(NamedTuple):
    classes: list  # sorted (``class_order``); head output i is classes[i]
    train: list  # (path, class name)
    val: Optional[list]  # None: no validation folder


def labelled_items(data_cfg):
    """The training (and validation) images with their classes; every validation class must be
    one the training images have."""
    if not data_cfg.train_dir:
        raise VlcapError("no training images: pass TRAIN_DIR (images named {class}_{n}.ext)")
    labels = read_labels_csv(data_cfg.labels) if data_cfg.labels else None
    train = labelled_images(data_cfg.train_dir, labels)
    classes = class_order(name for _, name in train)
    val = labelled_images(data_cfg.val_dir, labels) if data_cfg.val_dir else None
    unknown = sorted(set(name for _, name in val or ()) - set(classes))
    if unknown:
        raise VlcapError(f"{data_cfg.val_dir}: class(es) {few(unknown)} have no training image in {data_cfg.train_dir}")
    return LabelledItems(classes, train, val)


# --- The step --------------------------------------------------------------------------------

class ClassificationLoss(torch.nn.Module):
    """The step's forward as one module, for DDP: the mean cross-entropy of the batch."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixels, labels):
        return F.cross_entropy(self.model(pixels).float(), labels)


@torch.no_grad()
def evaluate_classifier(model, loader, device, dtype, unreadable):
    """``(mean loss, accuracy)`` over ``loader``'s readable images; the unreadable are collected."""
    total, correct, count = 0.0, 0, 0
    with evaluating(model):
        for batch in loader:
            unreadable.update(batch.unreadable)
            if batch.pixels is None:
                continue
            labels = batch.labels.to(device)
            with autocast(device, dtype):
                logits = model(batch.pixels.to(device)).float()
            total += float(F.cross_entropy(logits, labels, reduction="sum"))
            correct += int((logits.argmax(dim=-1) == labels).sum())
            count += len(labels)
    if not count:
        raise VlcapError(f"no validation image could be read: {few(sorted(unreadable), 2)}")
    return total / count, correct / count


@dataclass
class ClassifierResult:
    run_dir: Path
    best_checkpoint: Path
    last_checkpoint: Path
    classes: list
    trainable: int
    steps: int
    history: list = field(default_factory=list)
    unreadable: list = field(default_factory=list)
    best: Optional[dict] = None


def check_config(cfg):
    train = cfg.train
    if train.optimizer not in CLASSIFIER_OPTIMIZERS:
        raise VlcapError(f"train.optimizer={train.optimizer!r}: choose one of {', '.join(CLASSIFIER_OPTIMIZERS)}")
    if train.optimizer == "sam" and train.grad_accum != 1:
        raise VlcapError("SAM takes its second gradient on the same batch, so it needs train.grad_accum=1; "
                         "lower --batch-size instead")
    if train.optimizer == "sam" and not (isinstance(train.sam_rho, (int, float)) and train.sam_rho > 0):
        raise VlcapError(f"train.sam_rho={train.sam_rho!r}: SAM's neighbourhood radius must be a number > 0, "
                         "e.g. --set train.sam_rho=0.05")


class ClassifierTrainer(TrainingLoop):
    command = COMMAND

    def build(self, cfg, initialise):
        check_config(cfg)
        self.sam = cfg.train.optimizer == "sam"
        if self.sam and self.amp.skips_overflowing_steps:
            raise VlcapError("SAM cannot run under fp16's loss scaling; set train.amp to bf16 or off")
        self.items = labelled_items(cfg.data)
        self.model = ViTClassifier(cfg.model, self.items.classes).to(self.device)
        self.cfg = cfg
        self.trainable_count = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        self.train_loader, self.val = self.loaders(cfg.train)
        self.selection = Selection("val_accuracy", True) if self.val is not None else Selection("train_loss", False)
        self.step_model = distributed.wrap(ClassificationLoss(self.model), self.ctx, self.device)
        self.batch = None  # the step's last micro-batch and its weight, for SAM's second pass

    def loaders(self, train_cfg):
        """The training loader (in ``distributed.train_sampler`` order) and the validation one."""
        transform = self.model.transform()
        per_rank = distributed.per_rank_batch(train_cfg.batch_size, self.ctx)
        args = dict(batch_size=per_rank, num_workers=train_cfg.num_workers, pin_memory=self.device.type == "cuda",
                    worker_init_fn=resume_lib.ignore_interrupts_in_worker, collate_fn=collate_labelled)
        train_set = LabelledDataset(self.items.train, self.items.classes, transform)
        sampler, _ = distributed.train_sampler(train_set, per_rank, self.ctx, train_cfg.seed)
        train = DataLoader(train_set, sampler=sampler, generator=torch.Generator().manual_seed(train_cfg.seed), **args)
        if self.items.val is None:
            return train, None
        return train, DataLoader(LabelledDataset(self.items.val, self.items.classes, transform), shuffle=False, **args)

    def make_optimizer(self):
        optimizer = build_optimizer(self.trainable, self.cfg.train)
        return SAM(optimizer, self.cfg.train.sam_rho) if self.sam else optimizer

    def forward_backward(self, batch, weight, sync, where):
        pixels, labels = batch.pixels.to(self.device), batch.labels.to(self.device)
        with distributed.sync_gradients(self.step_model, self.ctx, sync):
            with self.amp.autocast():
                loss = self.step_model(pixels, labels)
            self.guard.check_loss(loss, where)
            self.amp.backward(self.schedule.micro_loss(loss, weight))
        return loss

    def train_micro_batch(self, batch, steps_now, where):
        weight = distributed.loss_weight(batch.labels, self.ctx)
        self.state.skipped_batches += weight is None and self.ctx.enabled
        self.batch = None if weight is None else (batch, weight)
        if weight is None:
            return
        loss = self.forward_backward(batch, weight, steps_now, where)
        n = len(batch.labels)
        self.state.running += loss.item() * n
        self.state.seen += n
        self.state.tokens += n  # the loss is a mean over images

    def optimizer_step(self, where):
        """SAM: move to the worst point near the weights along the step's gradient, take the
        gradient there on the same batch, then (``super``) clip and step from the weights."""
        if self.sam and self.batch is not None:
            self.guard.check_gradient_norm(self.optimizer.first_step(zero_grad=True), where)
            self.forward_backward(*self.batch, True, f"{where}, SAM's second pass")
        super().optimizer_step(where)

    def validate(self):
        loss, accuracy = evaluate_classifier(self.model, self.val, self.device, self.amp.dtype, self.state.unreadable)
        return {"val_loss": loss, "val_accuracy": accuracy}

    def save_checkpoint(self, path, record):
        return save_classifier(path, self.model, self.cfg, record)

    def announce(self):
        processes = f" x {self.ctx.world_size} processes" if self.ctx.enabled else ""
        resumed = f" (resumed at step {self.state.step})" if self.resumed else ""
        val = f", {len(self.items.val):,} validation images" if self.items.val is not None else ""
        say(self.console, f"{COMMAND} {self.cfg.model.encoder} ({self.cfg.model.method}, {self.cfg.train.optimizer}) "
            f"on {self.device}{processes}: {self.trainable_count:,} trainable parameters, {len(self.items.classes)} "
            f"classes, {len(self.items.train):,} training images{val}, {self.schedule.total_steps} steps{resumed} "
            f"-> {self.run_dir}")

    def report_skipped(self):
        unreadable = sorted(self.state.unreadable)
        if unreadable:
            say(self.console, f"{len(unreadable)} unreadable image(s) were skipped: {few(unreadable, 3)}", "yellow")

    def result(self):
        state = self.state
        best = next((r for r in state.history if r.get(self.selection.key) == state.best_value), None)
        return ClassifierResult(self.run_dir, self.best_path, self.last_path, self.items.classes,
                                self.trainable_count, state.step, state.history, sorted(state.unreadable), best)


def train_classifier(cfg, run_dir, console=None, resume=False, new_length=False, overwrite=False):
    """Train ``cfg`` into ``run_dir``, held (``resume.run_lock``) until the run ends (with
    ``resume``: continue it; ``cfg`` is then the run's own config, see
    ``classifier_resume_config``). A new run into a directory holding another run's resume state
    is refused unless ``overwrite``. Returns a ``ClassifierResult``."""
    with resume_lib.run_lock(run_dir, COMMAND):
        if not resume:
            resume_lib.refuse_replacing(run_dir, overwrite, COMMAND)
        return ClassifierTrainer(cfg, run_dir, console, resume, new_length).run()


def classifier_resume_config(run_dir, train_overrides=None):
    """The classifier run's ``config.yaml`` with ``train_overrides``, as ``resume.resume_config``
    reads a captioner run's (the same resumable keys, validated the same way)."""
    return resume_lib.resume_config(run_dir, train_overrides, ClassifierConfig, COMMAND)
