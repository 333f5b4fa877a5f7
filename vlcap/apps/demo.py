"""``vlcap demo``: the whole pipeline offline on 2 CPU cores in a few minutes.

Writes a synthetic shapes set, trains the tiny decoder as a language model on its captions (the
stand-in for pretrained GPT-2, which cannot be downloaded offline), trains every installed PEFT
method under every installed connector on that frozen decoder with the tiny preset, reloads each
checkpoint from disk, captions held-out images and prints one comparison table.
"""
import torch
from rich.table import Table
from torch.nn.utils.rnn import pad_sequence

from vlcap.core import config as config_lib
from vlcap.core.model.captioner import tokenizer_for
from vlcap.core.model.checkpoint import load_checkpoint
from vlcap.core.data import load_captions
from vlcap.core.console import say, text
from vlcap.core.errors import VlcapError
from vlcap.core.progress import progress_bar
from vlcap.core.model.course_weights import save_course_weights
from vlcap.core.model.gpt2 import GPT2Decoder
from vlcap.core.infer.captioning import caption_paths
from vlcap.core.model.peft import seeded
from vlcap.apps.synthetic import make_synthetic_set
from vlcap.core.model.tokenizer import IGNORE_INDEX
from vlcap.core.eval.metrics import check_metric_runs, metric_config
from vlcap.core.train.trainer import train


def usable_metrics(names, registry, console):
    """The default metrics that can run here: the demo must work offline on a bare machine
    (CIDEr needs java), so it says what it leaves out instead of failing."""
    usable = []
    for name in names:
        try:
            metric = registry.get("metric", name)
            check_metric_runs(metric, metric_config(metric, None))
            usable.append(name)
        except VlcapError as exc:
            say(console, f"demo: skipping {name}: {exc}", "yellow")
    return usable


def pretrain_decoder(cfg, captions, path, steps, batch_size=32, lr=3e-3, console=None):
    """Train the tiny GPT-2 as a plain language model on ``captions`` and write it as a course
    ``decoder_model.bin``. A frozen *random* decoder knows no words, so PEFT on it can only
    learn noise; the real workflow freezes a pretrained GPT-2, and this is the demo's stand-in.
    The decoder has no connector here, so it reads no image, as GPT-2 does not."""
    tokenizer = tokenizer_for(cfg)
    pairs = [tokenizer.training_pair(text, cfg.data.max_caption_tokens)[:2] for _, text in captions]
    with seeded(cfg.model.init_seed):
        decoder = GPT2Decoder(cfg.model.decoder)
        order = torch.randint(len(pairs), (steps, batch_size))
    optimizer = torch.optim.AdamW(decoder.pretrained_parameters(), lr=lr, fused=True)
    with progress_bar("language-model warm start", console, transient=True, disable=console is None) as progress:
        task = progress.add_task("warm start", total=steps)
        for rows in order:
            loss = language_model_step(decoder, optimizer, pairs, rows, tokenizer.eot_id)
            progress.advance(task)
    save_course_weights(decoder, path)
    return loss


def language_model_step(decoder, optimizer, pairs, rows, pad_id):
    """One optimizer step of next-token prediction on the captions ``pairs[rows]``; returns the loss."""
    inputs, labels = ([torch.tensor(pairs[i][part]) for i in rows.tolist()] for part in (0, 1))
    inputs = pad_sequence(inputs, batch_first=True, padding_value=pad_id)
    labels = pad_sequence(labels, batch_first=True, padding_value=IGNORE_INDEX)
    loss = decoder.next_token_loss(inputs, labels)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def run_demo(out_dir, registry, console, steps=300, methods=None, connectors=None, examples=3):
    """Train ``methods`` (default: every installed PEFT method) under ``connectors`` (default: every
    installed connector) on the synthetic set and print the samples and results tables."""
    data = make_synthetic_set(out_dir / "data")
    decoder_weights = out_dir / "decoder_model.bin"
    lm_loss = pretrain_decoder(config_lib.resolve("tiny"), load_captions(data / "train.json").captions, decoder_weights,
                               steps=max(steps // 3, 1), console=console)
    say(console, f"demo: tiny GPT-2 trained as a language model on the training captions (loss {lm_loss:.2f}), "
        f"frozen from here on -> {decoder_weights}")
    val = load_captions(data / "val.json")
    references = val.references()
    paths = [data / "images_val" / name for name in sorted(val.images.values())]
    metric_names = usable_metrics(config_lib.resolve("tiny").train.metrics, registry, console)
    runs = {}
    for connector in connectors or registry.names("connector"):
        for method in methods or registry.names("peft"):
            result = train(demo_config(connector, method, data, decoder_weights, steps, metric_names),
                           out_dir / "runs" / connector / method, registry, console,
                           overwrite=True)  # a demo run again replaces its own runs
            runs[(connector, method)] = (result, caption_with_best(result, paths, registry, console))
    console.print(samples_table(runs, paths[:examples], references))
    console.print(results_table(runs, references, metric_names, steps))
    say(console, "'exact': share of held-out images whose caption equals one of its five references. "
        f"Checkpoints and configs are under {out_dir / 'runs'}.")


def demo_config(connector, method, data, decoder_weights, steps, metric_names):
    """The tiny preset on the synthetic set, over the warm-started frozen decoder."""
    return config_lib.resolve("tiny", overrides=[{
        "connector": {"name": connector}, "peft": {"method": method},
        "model": {"decoder_weights": str(decoder_weights), "random_decoder": False},
        "data": {"train_json": str(data / "train.json"), "train_images": str(data / "images_train"),
                 "val_json": str(data / "val.json"), "val_images": str(data / "images_val")},
        "train": {"max_steps": steps, "epochs": 1000, "metrics": metric_names}}])


def caption_with_best(result, paths, registry, console):
    """Captions of ``paths`` by the run's best checkpoint, reloaded from disk (merged where the
    method can merge), as a user would caption with it."""
    loaded = load_checkpoint(result.best_checkpoint, registry)
    if loaded.method.can_merge:
        loaded.method.merge(loaded.captioner)
    return caption_paths(loaded, paths, registry, batch_size=25, console=console).predictions


def exact_share(predictions, references):
    """The share of images whose caption equals one of their references (case and final dot aside)."""
    return sum(p.lower().rstrip(".") in {r.lower().rstrip(".") for r in references[s]}
               for s, p in predictions.items()) / len(predictions)


def results_table(runs, references, metric_names, steps):
    """One row per connector and method; every number comes from the best checkpoint, which made
    the captions."""
    table = Table(title=f"vlcap demo: tiny preset, {steps} steps per run, synthetic shapes "
                        "(scores of the best checkpoint)")
    for column in ("connector", "method", "trainable", "checkpoint", "best epoch", "train loss", "val loss",
                   *metric_names, "exact"):
        table.add_column(column, justify="left" if column in ("connector", "method") else "right")
    for (connector, method), (result, predictions) in runs.items():
        best = result.best
        cells = [f"{best.get(name, float('nan')):.3f}" for name in ("train_loss", "val_loss", *metric_names)]
        table.add_row(text(connector), text(method), f"{result.trainable:,}",
                      f"{result.best_checkpoint.stat().st_size / 1024:.0f} KiB",
                      str(best["epoch"]), *cells, f"{exact_share(predictions, references):.0%}")
    return table


def samples_table(runs, paths, references):
    table = Table(title="held-out captions (from the reloaded best checkpoints)")
    for column in ("image", "reference", *(f"{connector}\n{method}" for connector, method in runs)):
        table.add_column(text(column))
    for path in paths:
        table.add_row(text(path.name), text(references[path.stem][0]),
                      *(text(predictions[path.stem]) for _, predictions in runs.values()))
    return table
