"""The ``vlcap`` command line."""
import json
import math
import sys
import warnings
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

import vlcap
from vlcap.core import config as config_lib
from vlcap.core.errors import VlcapError, VlcapWarning, few

console = Console()
err_console = Console(stderr=True)


def show_warning(message, category, filename, lineno, file=None, line=None, _default=warnings.showwarning):
    """vlcap's own warnings as one line on stderr; anyone else's as Python prints them."""
    if issubclass(category, VlcapWarning):
        err_console.print(f"warning: {message}", style="yellow", markup=False, highlight=False, soft_wrap=True)
    else:
        _default(message, category, filename, lineno, file, line)


class VlcapGroup(click.Group):
    """Turns a ``VlcapError`` (a problem the user can fix) into one line on stderr, no traceback."""

    def invoke(self, ctx):
        try:
            with warnings.catch_warnings():
                warnings.showwarning = show_warning
                return super().invoke(ctx)
        except VlcapError as exc:
            raise click.ClickException(str(exc)) from None


@click.group(cls=VlcapGroup)
@click.version_option(version=vlcap.__version__, prog_name="vlcap")
@click.option("--strict-plugins", is_flag=True, envvar="VLCAP_STRICT_PLUGINS",
              help="A plugin that fails to import or register is an error, not a skipped plugin with a warning.")
@click.option("--trace-plugins", is_flag=True, envvar="VLCAP_TRACE_PLUGINS",
              help="Log every plugin hook call to stderr.")
def main(strict_plugins, trace_plugins):
    """Parameter-efficient fine-tuning of ViT + GPT-2 image captioners.

    Plugins load from the `vlcap` entry-point group; VLCAP_LOAD_PLUGINS=pkg-a,pkg-b loads only
    those packages' (empty: none but vlcap's own)."""


def registry():
    """The plugin registry, with the group's --strict-plugins / --trace-plugins applied."""
    from vlcap.core.plugins import registry as load
    ctx = click.get_current_context(silent=True)
    params = ctx.find_root().params if ctx else {}
    return load(strict=params.get("strict_plugins", False), trace=params.get("trace_plugins", False))


@main.command("list-plugins")
@click.option("--json", "as_json", is_flag=True, help="Print JSON objects instead of a table.")
@click.option("--hooks", is_flag=True, help="Show each plugin module: its package and the hooks it implements.")
def list_plugins(as_json, hooks):
    """List the installed PEFT methods, decoding strategies and metrics."""
    reg = registry()
    if hooks:
        if as_json:
            click.echo(json.dumps([m.as_dict() for m in reg.modules], indent=2))
            return
        table = Table(title="vlcap plugin modules")
        for column in ("entry point", "module", "package", "version", "hooks"):
            table.add_column(column, overflow="fold")
        for m in reg.modules:
            table.add_row(m.entry_point, m.module, m.package, m.version,
                          f"[red]failed: {m.error}[/]" if m.error else "\n".join(m.hooks))
        console.print(table)
        return
    entries = reg.entries()
    if as_json:
        click.echo(json.dumps([e.as_dict() for e in entries], indent=2))
        return
    table = Table(title="vlcap plugins")
    for column in ("name", "kind", "package", "version", "description"):
        table.add_column(column)
    for e in entries:
        table.add_row(e.name, e.kind, e.package, e.version, e.description)
    for m in reg.failed():
        table.add_row(m.entry_point, "[red]failed", m.package, m.version, f"skipped: {m.error}")
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
@click.option("--feature-cache", type=click.Path(file_okay=False),
              help="Train from this cache of the encoder's tokens (see `vlcap cache-features`).")
@click.option("--cache-features", is_flag=True,
              help="Build the feature cache first (at --feature-cache, default OUT/feature_cache) unless it exists.")
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False),
              help="Continue the stopped run in this directory, with its own config.yaml (only --device may change).")
def train(config_file, preset, peft, encoder, decoder_weights, train_json, train_images, val_json,
          val_images, out, epochs, max_steps, batch_size, lr, device, assignments, dry_run, feature_cache,
          cache_features, resume_dir):
    """Train a captioner: only the cross-attention, projection and PEFT parameters learn."""
    if resume_dir:
        ctx = click.get_current_context()
        given = [p.opts[0] for p in ctx.command.params if p.name not in ("resume_dir", "device")
                 and ctx.get_parameter_source(p.name) == click.core.ParameterSource.COMMANDLINE]
        if given:
            raise VlcapError(f"--resume continues {resume_dir} with its own config.yaml; drop {', '.join(given)}")
        from vlcap.core.train.resume import resume_config
        from vlcap.core.train.trainer import train as run_training
        report_training(run_training(resume_config(resume_dir, device), resume_dir, registry(),
                                     console=err_console, resume=True))
        return
    options = {"peft": {"method": peft}, "model": {"encoder": encoder, "decoder_weights": decoder_weights},
               "data": {"train_json": train_json, "train_images": train_images,
                        "val_json": val_json, "val_images": val_images, "feature_cache": feature_cache,
                        "cache_features": cache_features or None},
               "train": {"epochs": epochs, "max_steps": max_steps, "batch_size": batch_size, "lr": lr,
                         "device": device}}
    flags = {section: {k: v for k, v in values.items() if v is not None} for section, values in options.items()}
    cfg = config_lib.resolve(preset, config_file, [flags, config_lib.parse_set(assignments)])
    if dry_run:
        from vlcap.core.model.captioner import build_captioner
        from vlcap.core.model.peft import MAX_TRAINABLE, check_budget, count_parameters
        captioner = build_captioner(cfg, registry(), meta=True).captioner
        counts = count_parameters(captioner)
        console.print(parameter_table(counts, f"{cfg.model.encoder} + GPT-2 ({cfg.model.decoder.n_layer} layers) + {cfg.peft.method}"))
        console.print(f"trainable: {counts.trainable:,} of the {MAX_TRAINABLE:,} budget")
        check_budget(counts.trainable)
        return
    if not out:
        raise VlcapError("no run directory: pass --out DIR")
    from vlcap.core.train.trainer import train as run_training
    report_training(run_training(cfg, out, registry(), console=err_console))


def report_training(result):
    from vlcap.core.train.distributed import is_main_process
    if is_main_process():
        console.print(f"trained {result.steps} steps; {result.saved:,} parameters saved to {result.best_checkpoint} "
                      f"(best) and {result.last_checkpoint} (last)")


@main.command("cache-features")
@click.option("--images", "image_dir", required=True, type=click.Path(file_okay=False), help="Folder of images to encode.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Cache directory to create.")
@click.option("--encoder", help="timm ViT name (default: the preset's / config's encoder).")
@click.option("--preset", type=click.Choice(sorted(config_lib.PRESETS)), default="full", show_default=True,
              help="Resolve the encoder as `vlcap train --preset` does.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML run config (as for train).")
@click.option("--set", "assignments", multiple=True, metavar="KEY=VALUE", help="Config override, as for train.")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True)
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:1, ...")
def cache_features(image_dir, out, encoder, preset, config_file, assignments, dtype, batch_size, device):
    """Run the frozen encoder over every image in a folder once; `train --feature-cache` reads the tokens."""
    from vlcap.core.model.captioner import build_encoder
    from vlcap.core.train.feature_cache import write_feature_cache
    from vlcap.core.model.peft import seeded
    from vlcap.core.runtime import resolve_device
    flags = {"model": {"encoder": encoder}} if encoder else {}
    cfg = config_lib.resolve(preset, config_file, [flags, config_lib.parse_set(assignments)])
    device = resolve_device(device)
    with seeded(cfg.model.init_seed):  # the same random weights a non-pretrained encoder gets in training
        vit = build_encoder(cfg).to(device)
    cache = write_feature_cache(vit, image_dir, out, dtype=dtype, batch_size=batch_size, device=device,
                                console=err_console)
    console.print(f"cached {len(cache.rows):,} images -> {cache.path}")


@main.command()
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the metadata and tensors as JSON.")
def inspect(checkpoint, as_json):
    """Show what a vlcap checkpoint holds."""
    from vlcap.core.model.checkpoint import read_metadata
    from vlcap.core.model.peft import parameter_group
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
    from vlcap.apps.demo import run_demo
    run_demo(Path(out), registry(), console, steps=steps, methods=methods or None)


@main.command()
@click.argument("images_dir", type=click.Path())
@click.option("--labels", "labels_file", required=True, type=click.Path(), help="id2label.json: {\"0\": \"bicycle\", ...}.")
@click.option("--out", type=click.Path(dir_okay=False), help="Write predictions here as 'filename,label' CSV.")
@click.option("--template", "templates", multiple=True, metavar="TEXT",
              help="Prompt with {object} for the class name (repeatable; several are ensembled). "
                   "Default: CLIP's 18 CIFAR prompts.")
@click.option("--clip-model", help="OpenAI CLIP name or local OpenAI-format file (default: $VLCAP_CLIP_MODEL, else ViT-L/14).")
@click.option("--report", is_flag=True, help="Print the accuracy of each template and of their ensemble.")
@click.option("--ground-truth", type=click.Path(dir_okay=False),
              help="'filename,label' CSV for --report (default: the class id prefix of {class}_{n}.png names).")
@click.option("--plot-top5", type=int, metavar="N", help="Save top-5 bar charts for N sampled images into --out-dir.")
@click.option("--out-dir", type=click.Path(file_okay=False), help="Folder for the --plot-top5 PNGs.")
@click.option("--seed", type=int, default=0, show_default=True, help="Which images --plot-top5 samples.")
@click.option("--batch-size", type=int, default=128, show_default=True)
@click.option("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available).")
@click.option("--skip-bad-images", is_flag=True, help="Classify the readable images instead of failing on unreadable ones.")
def classify(images_dir, labels_file, out, templates, clip_model, report, ground_truth, plot_top5, out_dir, seed,
             batch_size, device, skip_bad_images):
    """Zero-shot classification of the images in IMAGES_DIR with CLIP and text prompts."""
    from vlcap.apps import classify as zs
    from vlcap.core.data import find_images
    from vlcap.core.eval.clip import load_clip
    from vlcap.core.data import load_image
    if not (out or report or plot_top5):
        raise VlcapError("nothing to do: pass --out pred.csv, --report and/or --plot-top5 N --out-dir DIR")
    if plot_top5 is not None and (plot_top5 < 1 or not out_dir):
        raise VlcapError("--plot-top5 N needs N >= 1 and --out-dir DIR for the PNGs")
    # Every input is checked before the (possibly large) model loads.
    labels = zs.load_labels(labels_file)
    templates = [zs.check_template(t) for t in templates] or list(zs.DEFAULT_TEMPLATES)
    paths = find_images(images_dir)
    names = [p.name for p in paths]
    if report:
        truth = zs.load_ground_truth(ground_truth, names, labels) if ground_truth else zs.ground_truth_from_names(names, labels)

    clip = load_clip(clip_model, device=device, default="ViT-L/14")
    images = zs.encode_images(clip, paths, batch_size=batch_size, console=err_console)
    if images.bad and not skip_bad_images:
        raise VlcapError(f"{len(images.bad)} unreadable image(s) in {images_dir}: {few(n for n, _ in images.bad)}; "
                         "fix or remove them, or pass --skip-bad-images to classify the rest")
    if not images.files:
        raise VlcapError(f"{images_dir}: none of the images could be read")
    per_template = [zs.text_embeddings(clip, labels.names, t) for t in templates]
    probs = zs.probabilities(clip, images.embeddings, zs.ensemble(per_template))

    if out:
        zs.write_predictions(out, images.files, probs, labels)
        err_console.print(f"{len(images.files)} predictions written to {out}")
    if report:
        rows = list(zip(templates, per_template))
        if len(templates) > 1:
            rows.append((f"ensemble of {len(templates)} templates", zs.ensemble(per_template)))
        table = Table(title=f"zero-shot accuracy, {clip.name}, {len(images.files)} images")
        for column in ("template", "accuracy", "correct"):
            table.add_column(column, justify="left" if column == "template" else "right")
        for template, embeddings in rows:
            correct, total = zs.accuracy(zs.probabilities(clip, images.embeddings, embeddings), images.files, truth, labels)
            table.add_row(template, f"{100 * correct / total:.2f}%", f"{correct}/{total}")
        console.print(table)
    if plot_top5:
        for index in zs.sample(images.files, plot_top5, seed):
            name = images.files[index]
            title = name if not report else f"{name} (true: {labels.names[labels.ids.index(truth[name])]})"
            png = Path(out_dir) / f"{Path(name).stem}_top5.png"
            zs.plot_top5(load_image(Path(images_dir) / name), probs[index], labels, png, title=title)
        err_console.print(f"top-5 plots of {min(plot_top5, len(images.files))} images written to {out_dir}")


@main.command()
@click.option("--pred", "pred_path", required=True, type=click.Path(dir_okay=False),
              help="Predictions: a JSON object, image file stem -> caption (the course's format).")
@click.option("--annotations", "annotations_path", required=True, type=click.Path(dir_okay=False),
              help="The reference captions (COCO-style JSON, e.g. val.json).")
@click.option("--images", "image_dir", type=click.Path(file_okay=False), help="The images, for CLIPScore.")
@click.option("--no-clipscore", is_flag=True, help="CIDEr only (no images or CLIP model needed).")
@click.option("--clip-model", help="OpenAI CLIP name (ViT-B/32, ViT-L/14, ...) or a local OpenAI-format "
              "checkpoint; default $VLCAP_CLIP_MODEL, else ViT-B/32 as the course.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True, help="CLIP batch size.")
@click.option("--per-image", "per_image_path", type=click.Path(dir_okay=False),
              help="Write per-image scores to this CSV (best CLIPScore first).")
@click.option("--top-k", type=click.IntRange(min=0), default=5, show_default=True,
              help="Show the K best and K worst images by CLIPScore (by CIDEr with --no-clipscore).")
@click.option("--json", "as_json", is_flag=True, help="Print the scores as JSON.")
def evaluate(pred_path, annotations_path, image_dir, no_clipscore, clip_model, batch_size, per_image_path, top_k,
             as_json):
    """Score captions with CIDEr and CLIPScore exactly as the course's evaluator does."""
    from vlcap.core.eval.evaluation import evaluate_files
    result = evaluate_files(pred_path, annotations_path, image_dir, clipscore=not no_clipscore,
                            clip_model=clip_model, batch_size=batch_size, console=err_console)
    clip = result.clipscore
    if clip is not None and clip.truncated:
        err_console.print(f"[yellow]{len(clip.truncated)} caption(s) longer than CLIP's 77 tokens were truncated "
                          f"for CLIPScore (the course's script stops on them): {', '.join(clip.truncated[:4])}[/]")
    rows = per_image_rows(result)
    if per_image_path:
        from vlcap.core.outputs import write_csv
        columns = ["stem", "caption", "clipscore", "cider"]
        write_csv(per_image_path, columns, ([row[c] for c in columns] for row in rows))
    if as_json:
        click.echo(json.dumps({"images": result.images, "cider": result.cider.score,
                               "clipscore": clip.score if clip else None, "clip_model": result.clip_model,
                               "truncated": clip.truncated if clip else []}, indent=2))
        return
    table = Table(title=f"{pred_path} against {annotations_path} ({result.images:,} images)")
    for column in ("metric", "score", "how"):
        table.add_column(column, justify="right" if column == "score" else "left")
    table.add_row("CIDEr", f"{result.cider.score:.4f}", "CIDEr-D on PTB tokens; comparable only with the same references")
    if clip:
        table.add_row("CLIPScore", f"{clip.score:.4f}", f"2.5 * max(cos, 0) with CLIP {result.clip_model}")
    console.print(table)
    if top_k:
        by = "CLIPScore" if clip else "CIDEr"
        for title, chosen in ((f"top {top_k} by {by}", rows[:top_k]), (f"bottom {top_k} by {by}", rows[::-1][:top_k])):
            ranked = Table(title=title)
            scores = ("clipscore", "cider") if clip else ("cider",)
            for column in ("image", *scores, "caption"):
                ranked.add_column(column, justify="right" if column in scores else "left")
            for row in chosen:
                ranked.add_row(row["stem"], *(f"{row[k]:.4f}" for k in scores), row["caption"])
            console.print(ranked)
    if per_image_path:
        console.print(f"per-image scores: {per_image_path}")


def per_image_rows(result):
    """One row per image, best first (by CLIPScore when it was computed, else by CIDEr)."""
    clip = result.clipscore
    order = clip.per_image if clip else result.cider.per_image
    stems = sorted(order, key=lambda s: -order[s])
    return [{"stem": s, "caption": result.predictions[s], "clipscore": clip.per_image[s] if clip else None,
             "cider": result.cider.per_image[s]} for s in stems]


def checkpoint_options(command):
    """--checkpoint and --decoder-weights, for the commands that load a trained captioner."""
    command = click.option("--decoder-weights", type=click.Path(dir_okay=False),
                           help="decoder_model.bin (default: the path the checkpoint recorded).")(command)
    return click.option("--checkpoint", required=True, type=click.Path(dir_okay=False),
                        help="A checkpoint from `vlcap train`.")(command)


def decoding_options(command):
    """--decoding, --num-beams, --max-length and --set, for the commands that generate captions."""
    for option in reversed([
            click.option("--decoding", "strategy", help="Decoding strategy (default: the checkpoint's; see `vlcap list-plugins`)."),
            click.option("--num-beams", type=int, help="Shortcut for --set num_beams=N (beam search)."),
            click.option("--max-length", type=int, help="Most tokens per caption (default: the checkpoint's decoding.max_length)."),
            click.option("--set", "assignments", multiple=True, metavar="KEY=VALUE",
                         help="A decoding strategy option, e.g. --set length_penalty=0.8 or min_length=3 (repeatable).")]):
        command = option(command)
    return command


def decoding_set(assignments, num_beams):
    """The decoding strategy's options from --set KEY=VALUE and the --num-beams shortcut."""
    options = config_lib.parse_set(assignments)
    if num_beams is not None:
        options["num_beams"] = num_beams
    return options


@main.command()
@click.argument("images_dir", type=click.Path(file_okay=False))
@checkpoint_options
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Predictions JSON {file stem: caption}.")
@decoding_options
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:1, ... (auto: cuda if available).")
@click.option("--skip-bad-images", is_flag=True, help="Leave unreadable images out and exit 0.")
def caption(images_dir, checkpoint, decoder_weights, out, strategy, num_beams, max_length, assignments,
            batch_size, device, skip_bad_images):
    """Caption every jpg/jpeg/png/webp image in IMAGES_DIR into a {file stem: caption} JSON."""
    from vlcap.core.infer.captioning import caption_folder
    options = decoding_set(assignments, num_beams)
    result = caption_folder(images_dir, checkpoint, out, registry(), decoder_weights=decoder_weights,
                            strategy=strategy, options=options, max_length=max_length,
                            batch_size=batch_size, device=device, console=err_console)
    for message in result.bad_images:
        err_console.print(f"  unreadable: {message}", markup=False, highlight=False, soft_wrap=True)
    console.print(f"wrote {len(result.predictions)} captions to {out}")
    if result.bad_images and not skip_bad_images:
        raise VlcapError(f"{len(result.bad_images)} unreadable image(s) listed above have no caption in {out}; "
                         "fix or remove them, or pass --skip-bad-images")


@main.command()
@click.argument("images", nargs=-1, type=click.Path())
@checkpoint_options
@click.option("--out-dir", required=True, type=click.Path(file_okay=False), help="Folder for the PNGs (and .npz).")
@decoding_options
@click.option("--layer", type=int, default=-1, show_default=True, help="Decoder layer (negative: from the last).")
@click.option("--head", default="mean", show_default=True, help="Attention head index, or 'mean' over heads.")
@click.option("--pieces", is_flag=True, help="One panel per BPE token instead of per word.")
@click.option("--save-npz", is_flag=True, help="Also write the raw attention weights as STEM.npz.")
@click.option("--rank-by", type=click.Choice(["clipscore"]),
              help="Draw the best/worst images of --pred by CLIPScore (instead of IMAGES).")
@click.option("--pred", "pred_path", type=click.Path(dir_okay=False), help="Predictions JSON to rank (its captions are drawn).")
@click.option("--annotations", "annotations_path", type=click.Path(dir_okay=False), help="The reference captions (val.json).")
@click.option("--images", "image_dir", type=click.Path(file_okay=False), help="The annotated images, for --rank-by.")
@click.option("--top", type=int, default=1, show_default=True, help="How many of the best images to draw.")
@click.option("--bottom", type=int, default=1, show_default=True, help="How many of the worst images to draw.")
@click.option("--clip-model", help="CLIP for --rank-by (default: $VLCAP_CLIP_MODEL, else ViT-B/32 as the course).")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:1, ... (auto: cuda if available).")
def visualize(images, checkpoint, decoder_weights, out_dir, strategy, num_beams, max_length, assignments, layer, head,
              pieces, save_npz, rank_by, pred_path, annotations_path, image_dir, top, bottom, clip_model, device):
    """Draw each generated word's cross-attention over the image: one PNG per image in OUT_DIR."""
    from vlcap.apps import visualize as viz
    from vlcap.core.model.attention import parse_head
    from vlcap.core.model.checkpoint import load_checkpoint
    from vlcap.core.runtime import resolve_device
    parse_head(head)  # the range is checked once the checkpoint says how many heads there are
    options = decoding_set(assignments, num_beams)
    if rank_by:
        if images:
            raise VlcapError(f"--rank-by draws images chosen from --pred; drop the IMAGES arguments ({few(images)})")
        if not (pred_path and annotations_path and image_dir):
            raise VlcapError("--rank-by clipscore needs --pred pred.json, --annotations val.json and --images DIR")
        targets = viz.rank_by_clipscore(pred_path, annotations_path, image_dir, clip_model, top, bottom,
                                        console=err_console)
    else:
        if pred_path or annotations_path or image_dir:
            raise VlcapError("--pred, --annotations and --images choose images for --rank-by clipscore; "
                             "pass --rank-by clipscore, or give the images as arguments")
        targets = viz.collect_images(images)
        viz.check_readable(targets)
    loaded = load_checkpoint(checkpoint, registry(), decoder_weights=decoder_weights, device=resolve_device(device))
    for drawn in viz.visualize(loaded, targets, out_dir, registry(), strategy=strategy, options=options,
                               max_length=max_length, layer=layer, head=head, pieces=pieces, save_npz=save_npz):
        panels = f"{drawn.panels} panel{'s' * (drawn.panels != 1)}"
        note = f" ({drawn.note})" if drawn.note else ""
        console.print(f"{drawn.png}: {panels}, \"{drawn.caption}\"{note}", markup=False, highlight=False,
                      soft_wrap=True)


if __name__ == "__main__":
    sys.exit(main())
