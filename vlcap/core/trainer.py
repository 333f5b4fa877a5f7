"""The training loop. It knows no PEFT method, decoding strategy or metric by name: all three
come from the registry, chosen by the run config."""
import functools
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from timm.scheduler import CosineLRScheduler
from torch.utils.data import DataLoader

from vlcap.core import config as config_lib
from vlcap.core import distributed
from vlcap.core.atomic import atomic_write
from vlcap.core.captioner import CaptionLoss, build_captioner, tokenizer_for
from vlcap.core.checkpoint import save_checkpoint
from vlcap.core.data import (CaptionDataset, ImageDataset, check_images_exist, collate_captions,
                             load_captions)
from vlcap.core.decoding import caption_images
from vlcap.core.errors import VlcapError
from vlcap.core.feature_cache import CachedCaptionDataset, training_cache
from vlcap.core.gpt2 import save_course_weights
from vlcap.core.peft import check_budget, count_parameters


@dataclass
class TrainResult:
    run_dir: Path
    best_checkpoint: Path
    last_checkpoint: Path
    trainable: int
    saved: int
    steps: int
    history: list = field(default_factory=list)


def resolve_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_dtype(amp, device):
    """Mixed precision: on CUDA bf16 where the GPU has it, else fp16 (with loss scaling); on CPU
    only when asked for with ``train.amp=bf16``."""
    if device.type != "cuda":
        return torch.bfloat16 if amp == "bf16" else None
    if amp == "off":
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]


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


def prepare_model(cfg, registry, run_dir=None):
    """Tokenizer + captioner for a training run. With ``model.random_decoder`` and no weights
    file, the random decoder is written to ``run_dir/decoder_model.bin`` in the course format
    and recorded in ``cfg``, so every later command can load it."""
    tokenizer = tokenizer_for(cfg)
    weights = cfg.model.decoder_weights
    if weights is None and not cfg.model.random_decoder:
        raise VlcapError("no decoder weights: pass --decoder-weights PATH/decoder_model.bin "
                         "(or --preset tiny to run offline with a random decoder)")
    captioner, method = build_captioner(cfg, registry, decoder_weights=weights)
    if weights is None:
        path = (Path(run_dir) / "decoder_model.bin").resolve()
        save_course_weights(captioner.decoder, path)
        cfg.model.decoder_weights = str(path)
    return tokenizer, captioner, method


def make_loaders(cfg, captioner, tokenizer, device, ctx=distributed.Context(), cache=None):
    if not cfg.data.train_json or not cfg.data.train_images:
        raise VlcapError("no training data: pass --train-json FILE and --train-images DIR")
    transform = captioner.encoder.transform()
    loader_args = dict(batch_size=distributed.per_rank_batch(cfg.train.batch_size, ctx), num_workers=cfg.train.num_workers,
                       pin_memory=device.type == "cuda",
                       collate_fn=functools.partial(collate_captions, pad_id=tokenizer.eot_id))

    def caption_dataset(json_path, image_dir):
        captions = load_captions(json_path)
        check_images_exist(captions, image_dir, json_path)
        return captions, CaptionDataset(captions, image_dir, transform, tokenizer, cfg.data.max_caption_tokens)

    train_captions, train_set = caption_dataset(cfg.data.train_json, cfg.data.train_images)
    if cache is not None:
        cache.check_images(set(train_captions.images.values()), cfg.data.train_images, cfg.data.train_json)
        train_set = CachedCaptionDataset(train_set, cache)
    sampler, batch_sampler = distributed.train_sampler(train_set, loader_args["batch_size"], ctx, cfg.train.seed,
                                                       cfg.train.length_buckets)
    if batch_sampler is None:
        train_loader = DataLoader(train_set, sampler=sampler, **loader_args)
    else:
        train_loader = DataLoader(train_set, batch_sampler=batch_sampler,
                                  **{k: v for k, v in loader_args.items() if k != "batch_size"})
    val = None
    if cfg.data.val_json and cfg.data.val_images:
        val_captions, val_set = caption_dataset(cfg.data.val_json, cfg.data.val_images)
        names = sorted(set(val_captions.images.values()))[:cfg.train.max_val_images]
        image_paths = [Path(cfg.data.val_images) / name for name in names]
        val = {
            "loss": DataLoader(val_set, shuffle=False, **loader_args),
            "images": DataLoader(ImageDataset(image_paths, transform), batch_size=cfg.train.batch_size,
                                 num_workers=cfg.train.num_workers),
            "references": val_captions.references(),
            "paths": {p.stem: p for p in image_paths},
        }
    return train_loader, val


@torch.no_grad()
def validation_loss(captioner, loader, device, dtype):
    total, count = 0.0, 0
    for pixels, input_ids, labels in loader:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = captioner.loss(pixels.to(device), input_ids.to(device), labels.to(device))
        n = int((labels != -100).sum())
        total, count = total + float(loss) * n, count + n
    return total / max(count, 1)


@torch.no_grad()
def validation_metrics(captioner, val, tokenizer, cfg, registry, device, dtype):
    metrics = registry.entries("metric")
    if not metrics:
        return {}
    strategy = registry.get("decoding", cfg.decoding.strategy)
    predictions = {}
    for pixels, stems in val["images"]:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            captions = caption_images(captioner, pixels.to(device), tokenizer, strategy,
                                      cfg.decoding.options, cfg.decoding.max_length)
        predictions.update(zip(stems, captions))
    references = {stem: val["references"][stem] for stem in predictions}
    return {m.name: float(m.obj.compute(predictions, references, val["paths"])) for m in metrics}


def selection_key(cfg, registry, has_val):
    """(name, higher_is_better) of the number that picks the best checkpoint."""
    choice = cfg.train.best_metric
    if choice == "auto":
        metrics = registry.names("metric")
        choice = metrics[0] if metrics and has_val else ("val_loss" if has_val else "train_loss")
    if choice in ("val_loss", "train_loss"):
        if choice == "val_loss" and not has_val:
            raise VlcapError("train.best_metric=val_loss needs --val-json and --val-images")
        return choice, False
    return choice, registry.get("metric", choice).higher_is_better


def train(cfg, run_dir, registry, console=None):
    console = console or Console(stderr=True)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.train.seed)
    ctx, device = distributed.init(resolve_device(cfg.train.device))
    if not ctx.is_main:  # rank 0 alone logs, shows progress and writes the run directory
        console = Console(quiet=True)
    dtype = autocast_dtype(cfg.train.amp, device)

    tokenizer, captioner, method = prepare_model(cfg, registry, run_dir)
    counts = count_parameters(captioner)
    check_budget(counts.trainable)
    captioner.to(device)
    cache = training_cache(cfg, captioner.encoder, run_dir, console, ctx.is_main, ctx.barrier)
    train_loader, val = make_loaders(cfg, captioner, tokenizer, device, ctx, cache)
    configure_decoder(captioner, cfg)
    step_model = distributed.wrap(CaptionLoss(captioner, from_features=cache is not None), ctx, device)
    key, higher_is_better = selection_key(cfg, registry, val is not None)
    if ctx.is_main:
        with atomic_write(run_dir / "config.yaml", "w") as f:
            f.write(config_lib.dump_yaml(cfg))
    if train_loader.dataset.truncated:
        console.print(f"[yellow]{train_loader.dataset.truncated} training caption(s) longer than "
                      f"{cfg.data.max_caption_tokens} tokens were truncated[/]")

    trainable = [p for p in captioner.parameters() if p.requires_grad]
    # No weight decay on biases, LayerNorm and prefix vectors (GPT-2 / nanoGPT convention).
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in trainable if p.dim() >= 2], "weight_decay": cfg.train.weight_decay},
         {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0}],
        lr=cfg.train.lr, fused=device.type == "cuda")
    steps_per_epoch = math.ceil(len(train_loader) / cfg.train.grad_accum)
    total_steps = cfg.train.epochs * steps_per_epoch
    if cfg.train.max_steps is not None:
        total_steps = min(total_steps, cfg.train.max_steps)
    epochs = math.ceil(total_steps / steps_per_epoch)
    scheduler = CosineLRScheduler(optimizer, t_initial=max(total_steps, 1), lr_min=cfg.train.lr * cfg.train.min_lr_ratio,
                                  warmup_t=min(cfg.train.warmup_steps, max(total_steps - 1, 0)),
                                  warmup_lr_init=cfg.train.lr * 0.01, t_in_epochs=False)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    console.print(f"[bold]vlcap train[/] {cfg.peft.method} on {device}"
                  f"{f' x {ctx.world_size} processes' if ctx.enabled else ''}: {counts.trainable:,} trainable "
                  f"parameters, {len(train_loader.dataset):,} captions, {total_steps} steps -> {run_dir}"
                  f"{f' (from feature cache {cache.path})' if cache else ''}")
    best_path, last_path = run_dir / "best.safetensors", run_dir / "last.safetensors"
    best_value, step, history, saved = None, 0, [], 0
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                        console=console, disable=not ctx.is_main)
    with progress:
        task = progress.add_task("train", total=total_steps, stats="")
        for epoch in range(epochs):
            captioner.train()
            distributed.set_epoch(train_loader, epoch)
            running, seen, tokens, started = 0.0, 0, 0, time.perf_counter()
            micro_batches = len(train_loader)
            for i, (pixels, input_ids, labels) in enumerate(train_loader):
                pixels, input_ids, labels = pixels.to(device), input_ids.to(device), labels.to(device)
                with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                    loss = step_model(pixels, input_ids, labels)
                if not torch.isfinite(loss):
                    raise VlcapError(f"loss became {float(loss)} at step {step + 1} (epoch {epoch + 1}, batch {i + 1}); "
                                     f"the last good checkpoint is {last_path if last_path.exists() else 'not written yet'}; "
                                     "lower train.lr or set train.amp=off")
                scaler.scale(distributed.global_token_mean(loss, labels, ctx) / cfg.train.grad_accum).backward()
                # Token-weighted, like the validation loss: the same number with any process count.
                n = int((labels != -100).sum())
                running, seen, tokens = running + loss.item() * n, seen + len(pixels), tokens + n
                if (i + 1) % cfg.train.grad_accum and i + 1 != micro_batches:
                    continue
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(trainable, cfg.train.clip_grad)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                scheduler.step_update(step)
                loss_sum, items, token_sum = ctx.sum(running, seen, tokens)  # over all processes
                rate = items / (time.perf_counter() - started)
                progress.update(task, advance=1, description=f"epoch {epoch + 1}/{epochs}",
                                stats=f"loss {loss_sum / token_sum:.3f}  lr {optimizer.param_groups[0]['lr']:.2e}  {rate:.1f} img/s")
                if step >= total_steps:
                    break

            loss_sum, token_sum = ctx.sum(running, tokens)
            record = {"epoch": epoch + 1, "step": step, "train_loss": loss_sum / max(token_sum, 1)}
            history.append(record)
            if not ctx.is_main:  # the others wait while rank 0 validates and writes checkpoints
                ctx.barrier()
                continue
            if val is not None:
                captioner.eval()
                record["val_loss"] = validation_loss(captioner, val["loss"], device, dtype)
                record.update(validation_metrics(captioner, val, tokenizer, cfg, registry, device, dtype))
            saved = save_checkpoint(last_path, captioner, method, cfg, tokenizer, registry)
            value = record[key]
            if best_value is None or (value > best_value if higher_is_better else value < best_value):
                best_value = value
                save_checkpoint(best_path, captioner, method, cfg, tokenizer, registry)
            with open(run_dir / "history.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            progress.console.print("  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                             for k, v in record.items()))
            ctx.barrier()
    distributed.cleanup(ctx)
    return TrainResult(run_dir, best_path, last_path, counts.trainable, saved, step, history)
