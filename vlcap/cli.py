"""The ``vlcap`` command line."""
import json
import math
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from vlcap.core import config as config_lib
from vlcap.core.errors import VlcapError

console = Console()
err_console = Console(stderr=True)


class VlcapGroup(click.Group):
    """Turns a ``VlcapError`` (a problem the user can fix) into one line on stderr, no traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except VlcapError as exc:
            raise click.ClickException(str(exc)) from None


@click.group(cls=VlcapGroup)
@click.version_option(package_name="vlcap")
def main():
    """Parameter-efficient fine-tuning of ViT + GPT-2 image captioners."""


def registry():
    from vlcap.core.plugins import registry as load
    return load()


@main.command("list-plugins")
@click.option("--json", "as_json", is_flag=True, help="Print JSON objects instead of a table.")
def list_plugins(as_json):
    """List the installed PEFT methods, decoding strategies and metrics."""
    entries = registry().entries()
    if as_json:
        click.echo(json.dumps([e.as_dict() for e in entries], indent=2))
        return
    table = Table(title="vlcap plugins")
    for column in ("name", "kind", "package", "version", "description"):
        table.add_column(column)
    for e in entries:
        table.add_row(e.name, e.kind, e.package, e.version, e.description)
    console.print(table)


def parameter_table(counts, title):
    table = Table(title=title)
    for column in ("part", "trainable", "frozen"):
        table.add_column(column, justify="right" if column != "part" else "left")
    for group, (trainable, frozen) in sorted(counts.groups.items()):
        table.add_row(group, f"{trainable:,}", f"{frozen:,}")
    table.add_row("[bold]total", f"[bold]{counts.trainable:,}", f"{counts.frozen:,}")
    return table


@main.command()
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML run config.")
@click.option("--preset", type=click.Choice(sorted(config_lib.PRESETS)), default="full", show_default=True,
              help="'tiny': test ViT + random 2-layer GPT-2, runs offline in minutes.")
@click.option("--peft", help="PEFT method (see `vlcap list-plugins`).")
@click.option("--encoder", help="timm ViT name, e.g. vit_large_patch14_clip_224.openai.")
@click.option("--decoder-weights", type=click.Path(dir_okay=False), help="The course's decoder_model.bin.")
@click.option("--train-json", type=click.Path(dir_okay=False))
@click.option("--train-images", type=click.Path(file_okay=False))
@click.option("--val-json", type=click.Path(dir_okay=False))
@click.option("--val-images", type=click.Path(file_okay=False))
@click.option("--out", type=click.Path(file_okay=False), help="Run directory (checkpoints, config, history).")
@click.option("--epochs", type=int)
@click.option("--max-steps", type=int, help="Stop after this many optimizer steps.")
@click.option("--batch-size", type=int)
@click.option("--lr", type=float)
@click.option("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available).")
@click.option("--set", "assignments", multiple=True, metavar="KEY=VALUE",
              help="Override any config key, e.g. --set peft.options.r=16 (repeatable).")
@click.option("--dry-run", is_flag=True, help="Build the model (shapes only), print parameter counts, exit.")
def train(config_file, preset, peft, encoder, decoder_weights, train_json, train_images, val_json,
          val_images, out, epochs, max_steps, batch_size, lr, device, assignments, dry_run):
    """Train a captioner: only the cross-attention, projection and PEFT parameters learn."""
    options = {"peft": {"method": peft}, "model": {"encoder": encoder, "decoder_weights": decoder_weights},
               "data": {"train_json": train_json, "train_images": train_images,
                        "val_json": val_json, "val_images": val_images},
               "train": {"epochs": epochs, "max_steps": max_steps, "batch_size": batch_size, "lr": lr,
                         "device": device}}
    flags = {section: {k: v for k, v in values.items() if v is not None} for section, values in options.items()}
    cfg = config_lib.resolve(preset, config_file, [flags, config_lib.parse_set(assignments)])
    if dry_run:
        from vlcap.core.captioner import build_captioner
        from vlcap.core.peft import MAX_TRAINABLE, check_budget, count_parameters
        captioner, _ = build_captioner(cfg, registry(), meta=True)
        counts = count_parameters(captioner)
        console.print(parameter_table(counts, f"{cfg.model.encoder} + GPT-2 ({cfg.model.decoder.n_layer} layers) + {cfg.peft.method}"))
        console.print(f"trainable: {counts.trainable:,} of the {MAX_TRAINABLE:,} budget")
        check_budget(counts.trainable)
        return
    if not out:
        raise VlcapError("no run directory: pass --out DIR")
    from vlcap.core.trainer import train as run_training
    result = run_training(cfg, out, registry(), console=err_console)
    console.print(f"trained {result.steps} steps; {result.saved:,} parameters saved to {result.best_checkpoint} "
                  f"(best) and {result.last_checkpoint} (last)")


@main.command()
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the metadata and tensors as JSON.")
def inspect(checkpoint, as_json):
    """Show what a vlcap checkpoint holds."""
    from vlcap.core.checkpoint import read_metadata
    from vlcap.core.peft import parameter_group
    meta = read_metadata(checkpoint)
    shapes = meta.pop("shapes")
    if as_json:
        click.echo(json.dumps({**meta, "tensors": {k: list(v) for k, v in sorted(shapes.items())}}, indent=2))
        return
    cfg = meta["config"]
    table = Table(title=str(checkpoint), show_header=False)
    rows = [("format", meta["format"]), ("vlcap", meta.get("vlcap_version", "")),
            ("peft", f"{meta['peft']['name']} ({meta['peft']['package']} {meta['peft']['version']})"),
            ("peft options", json.dumps(cfg["peft"]["options"])), ("encoder", meta["encoder"]),
            ("decoder", json.dumps(cfg["model"]["decoder"])), ("decoder weights", str(cfg["model"]["decoder_weights"])),
            ("tokenizer", meta["tokenizer"]), ("parameters", f"{meta['parameters']:,}"), ("tensors", str(len(shapes)))]
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)
    groups = {}
    for name, shape in shapes.items():
        group = parameter_group(name)
        groups[group] = groups.get(group, 0) + math.prod(shape)
    for group, count in sorted(groups.items()):
        console.print(f"  {group}: {count:,}")


@main.command()
@click.option("--out", type=click.Path(file_okay=False), default="vlcap-demo", show_default=True)
@click.option("--steps", type=int, default=300, show_default=True, help="Training steps per method.")
@click.option("--peft", "methods", multiple=True, help="Only these methods (default: every installed one).")
def demo(out, steps, methods):
    """Train every PEFT method on a synthetic shapes set with the tiny preset, offline."""
    from vlcap.core.demo import run_demo
    run_demo(Path(out), registry(), console, steps=steps, methods=methods or None)


@main.command()
@click.argument("images_dir", type=click.Path(file_okay=False))
@click.option("--checkpoint", required=True, type=click.Path(dir_okay=False), help="A checkpoint from `vlcap train`.")
@click.option("--decoder-weights", type=click.Path(dir_okay=False),
              help="decoder_model.bin (default: the path the checkpoint recorded).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Predictions JSON {file stem: caption}.")
@click.option("--decoding", "strategy", help="Decoding strategy (default: the checkpoint's; see `vlcap list-plugins`).")
@click.option("--num-beams", type=int, help="Shortcut for --set num_beams=N (beam search).")
@click.option("--max-length", type=int, help="Most tokens per caption (default: the checkpoint's decoding.max_length).")
@click.option("--set", "assignments", multiple=True, metavar="KEY=VALUE",
              help="A decoding strategy option, e.g. --set length_penalty=0.8 (repeatable).")
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:1, ... (auto: cuda if available).")
@click.option("--skip-bad-images", is_flag=True, help="Leave unreadable images out and exit 0.")
def caption(images_dir, checkpoint, decoder_weights, out, strategy, num_beams, max_length, assignments,
            batch_size, device, skip_bad_images):
    """Caption every jpg/jpeg/png/webp image in IMAGES_DIR into a {file stem: caption} JSON."""
    from vlcap.core.inference import caption_folder
    options = config_lib.parse_set(assignments)
    if num_beams is not None:
        options["num_beams"] = num_beams
    result = caption_folder(images_dir, checkpoint, out, registry(), decoder_weights=decoder_weights,
                            strategy=strategy, options=options, max_length=max_length,
                            batch_size=batch_size, device=device, console=err_console)
    for path, reason in result.bad_images:
        err_console.print(f"  unreadable: {path} ({reason})", markup=False, highlight=False, soft_wrap=True)
    console.print(f"wrote {len(result.predictions)} captions to {out}")
    if result.bad_images and not skip_bad_images:
        raise VlcapError(f"{len(result.bad_images)} unreadable image(s) listed above have no caption in {out}; "
                         "fix or remove them, or pass --skip-bad-images")


if __name__ == "__main__":
    sys.exit(main())
