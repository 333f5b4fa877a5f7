"""``vlcap demo``: the whole pipeline offline on 2 CPU cores in a few minutes.

Writes a synthetic shapes set, trains every installed PEFT method with the tiny preset, reloads
each checkpoint from disk, captions held-out images and prints one comparison table.
"""
from rich.table import Table

from vlcap.core import config as config_lib
from vlcap.core.checkpoint import load_checkpoint
from vlcap.core.data import load_captions
from vlcap.core.errors import VlcapError
from vlcap.core.inference import caption_paths
from vlcap.core.synthetic import make_synthetic_set
from vlcap.core.trainer import train


def usable_metrics(names, registry, console):
    """The default metrics that can run here: the demo must work offline on a bare machine
    (CIDEr needs java), so it says what it leaves out instead of failing."""
    usable = []
    for name in names:
        try:
            registry.get("metric", name).check()
            usable.append(name)
        except VlcapError as exc:
            console.print(f"[yellow]demo: skipping {name}: {exc}[/]")
    return usable


def run_demo(out_dir, registry, console, steps=300, methods=None, examples=3):
    data = make_synthetic_set(out_dir / "data")
    val = load_captions(data / "val.json")
    references = val.references()
    paths = [data / "images_val" / name for name in sorted(val.images.values())]
    metric_names = usable_metrics(config_lib.resolve("tiny").train.metrics, registry, console)
    results = Table(title=f"vlcap demo: tiny preset, {steps} steps per method, synthetic shapes")
    for column in ("method", "trainable", "checkpoint", "train loss", "val loss", *metric_names, "exact"):
        results.add_column(column, justify="left" if column == "method" else "right")
    samples = Table(title="held-out captions (from the reloaded checkpoints)")
    samples.add_column("image")
    samples.add_column("reference")
    for method in methods or registry.names("peft"):
        samples.add_column(method)
    captions_by_method = {}
    for method in methods or registry.names("peft"):
        cfg = config_lib.resolve("tiny", overrides=[{
            "peft": {"method": method},
            "data": {"train_json": str(data / "train.json"), "train_images": str(data / "images_train"),
                     "val_json": str(data / "val.json"), "val_images": str(data / "images_val")},
            "train": {"max_steps": steps, "epochs": 1000, "metrics": metric_names}}])
        result = train(cfg, out_dir / "runs" / method, registry, console)
        loaded = load_checkpoint(result.best_checkpoint, registry)
        if loaded.method.can_merge:
            loaded.method.merge(loaded.captioner)
        predictions = caption_paths(loaded, paths, registry, batch_size=25, console=console).predictions
        captions_by_method[method] = predictions
        exact = sum(p.lower().rstrip(".") in {r.lower().rstrip(".") for r in references[s]}
                    for s, p in predictions.items()) / len(predictions)
        last = result.history[-1]
        metric_cells = [f"{last.get(name, float('nan')):.3f}" for name in metric_names]
        results.add_row(method, f"{result.trainable:,}", f"{result.best_checkpoint.stat().st_size / 1024:.0f} KiB",
                        f"{last['train_loss']:.3f}", f"{last['val_loss']:.3f}", *metric_cells, f"{exact:.0%}")
    for path in paths[:examples]:
        samples.add_row(path.name, references[path.stem][0],
                        *(captions_by_method[m][path.stem] for m in captions_by_method))
    console.print(samples)
    console.print(results)
    console.print("'exact': share of held-out images whose caption equals one of its five references. "
                  f"Checkpoints and configs are under {out_dir / 'runs'}.")
