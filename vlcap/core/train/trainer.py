"""The training loop. It knows no PEFT method, decoding strategy or metric by name: all three
come from the registry, chosen by the run config."""
import dataclasses
import functools
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from rich.console import Console
from timm.scheduler import CosineLRScheduler
from torch.utils.data import DataLoader

from vlcap.core import config as config_lib
from vlcap.core.train import distributed
from vlcap.core.train import resume as resume_lib
from vlcap.core.atomic import atomic_write
from vlcap.core.model.captioner import CaptionLoss, build_captioner, tokenizer_for
from vlcap.core.model.checkpoint import save_checkpoint
from vlcap.core.data import check_images_exist, iterate_images, load_captions
from vlcap.core.infer.decoding import caption_images
from vlcap.core.errors import VlcapError, few
from vlcap.core.progress import progress_bar
from vlcap.core.runtime import autocast, autocast_dtype, resolve_device
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


def configure_decoder(captioner, cfg):
    """The decoder's throughput options: gradient checkpointing and ``torch.compile`` (in place,
    so parameter names and checkpoints stay the same)."""
    captioner.decoder.gradient_checkpointing = cfg.train.grad_checkpointing
    if cfg.train.compile:
        captioner.decoder.compile(backend="inductor" if cfg.train.compile is True else cfg.train.compile)


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


def make_loaders(cfg, captioner, tokenizer, device, ctx=distributed.Context(), cache=None):
    if not cfg.data.train_json or not cfg.data.train_images:
        raise VlcapError("no training data: pass --train-json FILE and --train-images DIR")
    transform = captioner.encoder.transform()
    loader_args = dict(batch_size=distributed.per_rank_batch(cfg.train.batch_size, ctx), num_workers=cfg.train.num_workers,
                       pin_memory=device.type == "cuda", worker_init_fn=resume_lib.ignore_interrupts_in_worker,
                       collate_fn=functools.partial(collate_captions, pad_id=tokenizer.eot_id))

    def caption_dataset(json_path, image_dir):
        captions = load_captions(json_path)
        check_images_exist(captions, image_dir, json_path)
        return captions, CaptionDataset(captions, image_dir, transform, tokenizer, cfg.data.max_caption_tokens)

    train_captions, train_set = caption_dataset(cfg.data.train_json, cfg.data.train_images)
    if not len(train_set):
        raise VlcapError(f"{cfg.data.train_json}: no non-empty captions to train on")
    if cache is not None:
        cache.check_images(set(train_captions.images.values()), cfg.data.train_images, cfg.data.train_json)
        train_set = CachedCaptionDataset(train_set, cache)
    # The order is a function of (seed, epoch) alone, so a resumed run rebuilds it and N processes
    # see the batches one process would; the loader's own generator only seeds workers and keeps
    # the global RNG (dropout) untouched.
    sampler, batch_sampler = distributed.train_sampler(train_set, loader_args["batch_size"], ctx, cfg.train.seed,
                                                       cfg.train.length_buckets)
    generator = torch.Generator().manual_seed(cfg.train.seed)
    if batch_sampler is None:
        train_loader = DataLoader(train_set, sampler=sampler, generator=generator, **loader_args)
    else:
        train_loader = DataLoader(train_set, batch_sampler=batch_sampler, generator=generator,
                                  **{k: v for k, v in loader_args.items() if k != "batch_size"})
    val = None
    if cfg.data.val_json and cfg.data.val_images:
        val_captions, val_set = caption_dataset(cfg.data.val_json, cfg.data.val_images)
        references = val_captions.references()  # images listed without captions cannot be scored
        names = sorted(n for n in set(val_captions.images.values()) if Path(n).stem in references)
        image_paths = [Path(cfg.data.val_images) / name for name in names[:cfg.train.max_val_images]]
        val = {
            "loss": DataLoader(val_set, shuffle=False, **loader_args),
            "images": functools.partial(iterate_images, image_paths, transform, cfg.train.batch_size, device,
                                        num_workers=cfg.train.num_workers,
                                        worker_init_fn=resume_lib.ignore_interrupts_in_worker),
            "references": references,
            "paths": {p.stem: p for p in image_paths},
        }
    return train_loader, val


def build_optimizer(trainable, train_cfg):
    """AdamW over the trainable parameters; no weight decay on biases, LayerNorm and prefix
    vectors (the GPT-2 / nanoGPT convention). Fused on CPU too: one kernel for all tensors is
    ~4x faster than the per-tensor loop at ~30M parameters (and is HF Trainer's default)."""
    return torch.optim.AdamW(
        [{"params": [p for p in trainable if p.dim() >= 2], "weight_decay": train_cfg.weight_decay},
         {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0}],
        lr=train_cfg.lr, fused=True)


@torch.no_grad()
def validation_loss(captioner, loader, device, dtype, unreadable):
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
def validation_metrics(captioner, val, tokenizer, cfg, registry, device, dtype, unreadable):
    if not cfg.train.metrics:
        return {}
    strategy = registry.get("decoding", cfg.decoding.strategy)
    predictions = {}
    stems = list(val["paths"])
    for pixels, indices, skipped in val["images"]():
        unreadable.update(item.message for item in skipped)
        if pixels is None:
            continue
        with autocast(device, dtype):
            captions = caption_images(captioner, pixels, tokenizer, strategy,
                                      cfg.decoding.options, cfg.decoding.max_length)
        predictions.update(zip((stems[i] for i in indices), captions))
    if not predictions:
        raise VlcapError(f"no validation image could be read: {few(sorted(unreadable), 2)}")
    references = {stem: val["references"][stem] for stem in predictions}
    return {name: float(registry.get("metric", name).compute(predictions, references, val["paths"]))
            for name in cfg.train.metrics}


def selection_key(cfg, registry, has_val):
    """(name, higher_is_better) of the number that picks the best checkpoint. Also checks, before
    any training time is spent, that each metric in ``train.metrics`` is installed and can run."""
    names = cfg.train.metrics
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise VlcapError(f"train.metrics must be a list of metric names, e.g. --set train.metrics=[cider], got {names!r}")
    metrics = {name: registry.get("metric", name) for name in names}
    for name, metric in metrics.items() if has_val else ():
        try:
            metric.check()
        except VlcapError as exc:
            raise VlcapError(f"{exc} (or leave {name} out of train.metrics, e.g. --set train.metrics=[])") from None
    choice = cfg.train.best_metric
    if choice == "auto":
        choice = names[0] if names and has_val else ("val_loss" if has_val else "train_loss")
    if choice in ("val_loss", "train_loss"):
        if choice == "val_loss" and not has_val:
            raise VlcapError("train.best_metric=val_loss needs --val-json and --val-images")
        return choice, False
    metric = registry.get("metric", choice)
    if choice not in metrics or not has_val:
        raise VlcapError(f"train.best_metric={choice} is not computed: it needs --val-json/--val-images and "
                         f"{choice} in train.metrics (now {names})")
    return choice, metric.higher_is_better


class NonFinite(VlcapError):
    """A NaN/inf loss, gradient or weight stopped the run; the last good state was kept."""


def check_finite(named_parameters, step, what):
    """Refuse to write non-finite weights over the last good state."""
    bad = [name for name, p in named_parameters if not torch.isfinite(p).all()]
    if bad:
        raise NonFinite(f"parameters became non-finite ({few(bad)}) after step {step}; {what}")


def write_history(run_dir, history):
    """The whole history, atomically: a kill never leaves half a line, a resume never repeats one."""
    with atomic_write(Path(run_dir) / "history.jsonl", "w") as f:
        f.writelines(json.dumps(record) + "\n" for record in history)


def train(cfg, run_dir, registry, console=None, resume=False):
    """Train ``cfg`` into ``run_dir``. With ``resume``, continue from ``run_dir``'s resume state
    (``cfg`` must be that run's config, see ``resume.resume_config``)."""
    console = console or Console(stderr=True)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    state = resume_lib.load_state(run_dir) if resume else None
    if not resume:  # a new run here makes an old resume state meaningless (and misleading)
        resume_lib.state_path(run_dir).unlink(missing_ok=True)
    seed_everything(cfg.train.seed)
    ctx, device = distributed.init(resolve_device(cfg.train.device))
    if not ctx.is_main:  # rank 0 alone logs, shows progress and writes the run directory
        console = Console(quiet=True)
    dtype = autocast_dtype(cfg.train.amp, device)

    tokenizer, captioner, method, cfg = prepare_model(cfg, registry, run_dir)
    counts = count_parameters(captioner)
    check_budget(counts.trainable)
    captioner.to(device)
    cache = training_cache(cfg, captioner.encoder, run_dir, console, ctx.is_main, ctx.barrier)
    if cache is not None:  # the run records the cache it trained from
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, feature_cache=str(cache.path)))
    train_loader, val = make_loaders(cfg, captioner, tokenizer, device, ctx, cache)
    configure_decoder(captioner, cfg)
    step_model = distributed.wrap(CaptionLoss(captioner, from_features=cache is not None), ctx, device)
    key, higher_is_better = selection_key(cfg, registry, val is not None)
    if ctx.is_main:
        with atomic_write(run_dir / "config.yaml", "w") as f:
            f.write(config_lib.dump_yaml(cfg))
    dataset = train_loader.dataset
    if dataset.truncated:
        console.print(f"[yellow]{dataset.truncated} training caption(s) longer than "
                      f"{cfg.data.max_caption_tokens} tokens were truncated[/]")
    if dataset.empty:
        console.print(f"[yellow]{dataset.empty} empty training caption(s) were left out[/]")

    named_trainable = [(n, p) for n, p in captioner.named_parameters() if p.requires_grad]
    trainable = [p for _, p in named_trainable]
    optimizer = build_optimizer(trainable, cfg.train)
    batches_per_epoch = len(train_loader)
    steps_per_epoch = math.ceil(batches_per_epoch / cfg.train.grad_accum)
    total_steps = cfg.train.epochs * steps_per_epoch
    if cfg.train.max_steps is not None:
        total_steps = min(total_steps, cfg.train.max_steps)
    epochs = math.ceil(total_steps / steps_per_epoch)
    scheduler = CosineLRScheduler(optimizer, t_initial=max(total_steps, 1), lr_min=cfg.train.lr * cfg.train.min_lr_ratio,
                                  warmup_t=min(cfg.train.warmup_steps, max(total_steps - 1, 0)),
                                  warmup_lr_init=cfg.train.lr * 0.01, t_in_epochs=False)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    best_path, last_path = run_dir / "best.safetensors", run_dir / "last.safetensors"
    state_file = resume_lib.state_path(run_dir)
    best_value, step, history, unreadable, saved = None, 0, [], set(), 0
    skipped_batches = 0  # DDP: micro-batches every process skipped, as one had no readable image in them
    start_epoch, skip_batches, running, seen, tokens = 0, 0, 0.0, 0, 0
    if state is not None:
        resume_lib.restore_trainable(captioner, state["trainable"], state_file)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        step, best_value, history, unreadable = state["step"], state["best_value"], state["history"], set(state["unreadable"])
        start_epoch, skip_batches = state["epoch"], state["batches"]
        running, seen, tokens = state["running"], state["seen"], state["tokens"]
        skipped_batches = state.get("skipped_batches", 0)  # absent from states written before it was counted
        if step >= total_steps:
            raise VlcapError(f"{run_dir}: the run already finished ({step} of {total_steps} steps); nothing to resume")
        resume_lib.set_rng_state(state["rng"])  # last, after everything that draws random numbers

    def save_resume_state(epoch, batches):
        check_finite(named_trainable, step, f"the last good state stays in {state_file}")
        resume_lib.save_state(run_dir, {
            "trainable": {n: p.detach().cpu() for n, p in named_trainable},
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
            "rng": resume_lib.rng_state(), "epoch": epoch, "batches": batches,
            "running": running, "seen": seen, "tokens": tokens, "skipped_batches": skipped_batches,
            "step": step, "best_value": best_value, "history": history, "unreadable": sorted(unreadable)})

    def last_good():
        return f"the last good state is {state_file}" if state_file.exists() else "no state was saved yet"

    def stop(signal_name):
        return VlcapError(f"stopped by {signal_name} at step {step} of {total_steps}; state saved to {state_file}; "
                          f"continue with: vlcap train --resume {run_dir}")

    resumed = f" (resumed at step {step})" if state is not None else ""
    console.print(f"[bold]vlcap train[/] {cfg.peft.method} on {device}"
                  f"{f' x {ctx.world_size} processes' if ctx.enabled else ''}: {counts.trainable:,} trainable "
                  f"parameters, {len(dataset):,} captions, {total_steps} steps{resumed} -> {run_dir}"
                  f"{f' (from feature cache {cache.path})' if cache else ''}")
    progress = progress_bar(console=console, stats=True, disable=not ctx.is_main)
    with progress, resume_lib.stop_requests() as stop_signals:
        task = progress.add_task("train", total=total_steps, completed=step, stats="")
        for epoch in range(start_epoch, epochs):
            captioner.train()
            distributed.set_epoch(train_loader, epoch, skip_batches)
            started, seen_before = time.perf_counter(), seen
            for i, batch in enumerate(train_loader, start=skip_batches):
                unreadable.update(batch.unreadable)
                steps_now = (i + 1) % cfg.train.grad_accum == 0 or i + 1 == batches_per_epoch
                weight = distributed.loss_weight(None if batch.pixels is None else batch.labels, ctx)
                skipped_batches += weight is None and ctx.enabled  # counted alike by every process
                if weight is not None:
                    pixels, input_ids, labels = batch.pixels.to(device), batch.input_ids.to(device), batch.labels.to(device)
                    with distributed.sync_gradients(step_model, ctx, steps_now):
                        with autocast(device, dtype):
                            loss = step_model(pixels, input_ids, labels)
                        # Under DDP a non-finite loss stops every process at the gradient-norm check
                        # below (the gradients are all-reduced): one stopping alone strands the rest.
                        if not ctx.enabled and not torch.isfinite(loss):
                            raise NonFinite(f"loss became {loss.item()} at step {step + 1} (epoch {epoch + 1}, batch {i + 1}); "
                                            f"{last_good()}; lower train.lr or set train.amp=off")
                        scaler.scale(loss * weight / cfg.train.grad_accum).backward()
                    # Token-weighted, like the validation loss: the same number with any process count.
                    n = int((labels != IGNORE_INDEX).sum())
                    running, seen, tokens = running + loss.item() * n, seen + len(pixels), tokens + n
                if not steps_now:
                    continue
                scaler.unscale_(optimizer)
                norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.train.clip_grad)
                if not scaler.is_enabled() and not torch.isfinite(norm):  # fp16's scaler skips such steps itself
                    raise NonFinite(f"gradient norm became {float(norm)} at step {step + 1} (epoch {epoch + 1}, "
                                    f"batch {i + 1}); {last_good()}; lower train.lr")
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                scheduler.step_update(step)
                loss_sum, items, token_sum = ctx.sum(running, seen - seen_before, tokens)  # over all processes
                rate = items / max(time.perf_counter() - started, 1e-9)
                progress.update(task, advance=1, description=f"epoch {epoch + 1}/{epochs}",
                                stats=f"loss {loss_sum / max(token_sum, 1):.3f}  lr {optimizer.param_groups[0]['lr']:.2e}  {rate:.1f} img/s")
                if ctx.is_main and (stop_signals or step % cfg.train.save_every == 0):
                    save_resume_state(epoch, i + 1)
                if stop_signals:
                    raise stop(stop_signals[0])
                if step >= total_steps:
                    break
            skip_batches = 0
            if seen == 0:
                raise VlcapError(f"no training image could be read in epoch {epoch + 1}: {few(sorted(unreadable), 2)}")

            loss_sum, token_sum = ctx.sum(running, tokens)
            record = {"epoch": epoch + 1, "step": step, "train_loss": loss_sum / max(token_sum, 1)}
            history.append(record)
            running, seen, tokens = 0.0, 0, 0
            if not ctx.is_main:  # the others wait while rank 0 validates and writes checkpoints
                ctx.barrier()
                continue
            if val is not None:
                captioner.eval()
                record["val_loss"] = validation_loss(captioner, val["loss"], device, dtype, unreadable)
                record.update(validation_metrics(captioner, val, tokenizer, cfg, registry, device, dtype, unreadable))
            check_finite(named_trainable, step, f"{last_good()}")
            saved = save_checkpoint(last_path, captioner, method, cfg, tokenizer, registry)
            value = record[key]
            if best_value is None or (value > best_value if higher_is_better else value < best_value):
                best_value = value
                save_checkpoint(best_path, captioner, method, cfg, tokenizer, registry)
            write_history(run_dir, history)
            save_resume_state(epoch + 1, 0)
            progress.console.print("  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                             for k, v in record.items()))
            ctx.barrier()
            if stop_signals:
                raise stop(stop_signals[0])
    distributed.cleanup(ctx)
    if unreadable:
        console.print(f"[yellow]{len(unreadable)} unreadable image(s) were skipped: {few(sorted(unreadable), 3)}[/]")
    if skipped_batches:
        console.print(f"[yellow]{skipped_batches} batch(es) were skipped by every process: a process had no "
                      "readable image in its share of them[/]")
    return TrainResult(run_dir, best_path, last_path, counts.trainable, saved, step, history, sorted(unreadable))
