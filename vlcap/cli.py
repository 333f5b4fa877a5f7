"""The ``vlcap`` command line.

Each command parses its options, checks ``--device`` first (``resolve_device``: a device that is
not there is one line before anything loads), calls one function that does the work (in
``vlcap.apps`` or the core) and prints its result (tables from ``vlcap.apps.reports``). The flags
that set config keys are declared as data (``TRAIN_FLAGS``, ...) and become override dicts in
``config_overrides``.
"""
import functools
import json
import sys
import warnings
from pathlib import Path

import click
from rich.console import Console

import vlcap
from vlcap.apps import reports
from vlcap.core import config as config_lib
from vlcap.core.console import safe, say
from vlcap.core.errors import VlcapError, VlcapWarning

console = Console()
err_console = Console(stderr=True)


def show_warning(message, category, filename, lineno, file=None, line=None, _default=warnings.showwarning):
    """vlcap's own warnings as one line on stderr; anyone else's as Python prints them."""
    if issubclass(category, VlcapWarning):
        say(err_console, f"warning: {message}", "yellow")
    else:
        _default(message, category, filename, lineno, file, line)


class VlcapGroup(click.Group):
    """Turns a ``VlcapError`` (a problem the user can fix) into one line on stderr, no traceback,
    and adds the commands plugins register (``register_commands``) after vlcap's own."""

    def list_commands(self, ctx):
        return sorted({*super().list_commands(ctx), *plugin_commands(self)})

    def get_command(self, ctx, name):
        own = super().get_command(ctx, name)
        return own if own is not None else plugin_commands(self).get(name)

    def invoke(self, ctx):
        try:
            with warnings.catch_warnings():
                warnings.showwarning = show_warning
                return super().invoke(ctx)
        except VlcapError as exc:
            raise click.ClickException(safe(exc)) from None


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


def plugin_commands(group):
    """The commands plugins registered, by name; loaded only when a name is not one of vlcap's own
    (or for --help). One that would shadow a built-in command is skipped with a warning; a
    registry that fails to load (--strict-plugins) leaves only vlcap's own commands."""
    try:
        entries = registry().entries("command")
    except VlcapError as exc:
        err_console.print(f"warning: plugin commands not loaded: {exc}", style="yellow", markup=False)
        return {}
    commands = {}
    for entry in entries:
        if entry.name in group.commands:
            err_console.print(f"warning: command '{entry.name}' of package '{entry.package}' has the name of a vlcap "
                              "command; skipped it", style="yellow", markup=False, highlight=False, soft_wrap=True)
        else:
            commands[entry.name] = entry.obj
    return commands


DEVICE_HELP = "cpu, cuda, cuda:1, ... or auto (cuda if available)."
# --precision: what "auto" means for the captioner, and for CLIP (clip.load's fp16, the course's).
CAPTIONER_PRECISION = ("Precision the captioner computes in (never the checkpoint's training amp). auto: fp32 on "
                       "CPU; on CUDA bf16 where the GPU has it natively (compute capability 8.0+), else fp16.")
CLIP_PRECISION = "Precision of CLIP's weights. auto: fp32 on CPU, fp16 on CUDA (as OpenAI's clip.load and the course)."


def precision_option(help_text):
    """``--precision auto|fp32|bf16|fp16`` (``runtime.inference_dtype``), for every command that
    runs a trained captioner or CLIP."""
    return click.option("--precision", type=click.Choice(config_lib.PRECISIONS), default="auto", show_default=True,
                        help=help_text)


def checked_device(name):
    """``--device`` resolved before anything loads: a ``torch.device``, or one ``VlcapError``
    line naming the device and what is available (``vlcap.core.runtime.resolve_device``; imported
    here so that ``vlcap --help`` does not import torch)."""
    from vlcap.core.runtime import resolve_device
    return resolve_device(name)


# The flags that set one config key each, by parameter name (--config and --set reach every key).
# A flag that is not given (None) sets nothing, so the preset's or config file's value stays.
TRAIN_FLAGS = {
    "connector": "connector.name", "peft": "peft.method", "encoder": "model.encoder", "decoder_weights": "model.decoder_weights",
    "train_json": "data.train_json", "train_images": "data.train_images",
    "val_json": "data.val_json", "val_images": "data.val_images",
    "feature_cache": "data.feature_cache", "cache_features": "data.cache_features",
    "epochs": "train.epochs", "max_steps": "train.max_steps", "batch_size": "train.batch_size",
    "lr": "train.lr", "device": "train.device", "init_from": "train.init_from",
}
CACHE_FEATURES_FLAGS = {"encoder": "model.encoder"}
DECODING_FLAGS = {"num_beams": "num_beams"}  # into the decoding strategy's options
# The strategy each shortcut flag of DECODING_FLAGS stands for: --num-beams N is beam search.
SHORTCUT_STRATEGIES = {"num_beams": "beam"}
# The config keys a resumed run takes from the command line (resume_config applies them: where
# it runs and a new length); `train --resume` refuses every other option.
RESUMABLE_KEYS = {f"train.{key}" for key in config_lib.RESUMABLE_TRAIN_KEYS}


def config_overrides(flags, table):
    """The given flags (parameter name -> value; None: not given) as a nested override dict at
    their keys in ``table``: ``{"lr": 0.1, "epochs": None}`` -> ``{"train": {"lr": 0.1}}``.
    A flag missing from ``table`` is a KeyError: every such flag must be declared there."""
    overrides = {}
    for name, value in flags.items():
        key = table[name]
        if value is not None:
            config_lib.set_key(overrides, key, value)
    return overrides


@functools.cache
def preset_configs():
    """Each preset's resolved config as a dict."""
    return {preset: config_lib.to_dict(config_lib.resolve(preset)) for preset in config_lib.PRESETS}


def preset_default(key):
    """A config key's default in each preset, as ``--help`` shows it: ``"auto"`` where the presets
    agree, else ``"full: 5; tiny: 3"``; None for keys without a value and for on/off switches
    (a --config file or --set may still change it)."""
    values = {}
    for preset, config in preset_configs().items():
        value = config
        for part in key.split("."):
            value = value[part]
        values[preset] = value
    if any(v is None or isinstance(v, bool) for v in values.values()):
        return None
    if len(set(map(str, values.values()))) == 1:
        return str(next(iter(values.values())))
    return "; ".join(f"{preset}: {value}" for preset, value in values.items())


def config_flag(table, *decls, **attrs):
    """A ``click.option`` for a flag of ``table`` (named by its one ``--long-name``) whose
    ``--help`` shows the default its config key has in the presets."""
    name = decls[0].lstrip("-").replace("-", "_")
    shown = preset_default(table[name])
    if shown is not None:
        attrs.setdefault("show_default", shown)
    return click.option(*decls, **attrs)


@main.command("list-plugins")
@click.option("--json", "as_json", is_flag=True, help="Print JSON objects instead of a table.")
@click.option("--hooks", is_flag=True, help="Show each plugin module: its package and the hooks it implements.")
@click.option("--options", is_flag=True,
              help="Show each plugin's options (what --set NAME=VALUE, peft.options.NAME or connector.options.NAME "
                   "sets) with their types and defaults.")
def list_plugins(as_json, hooks, options):
    """List the installed connectors, PEFT methods, decoding strategies, metrics and plugin commands."""
    if hooks and options:
        raise VlcapError("--hooks and --options are two views of the plugins; pass one of them")
    reg = registry()
    if hooks and as_json:
        click.echo(json.dumps([m.as_dict() for m in reg.modules], indent=2))
    elif hooks:
        console.print(reports.plugin_modules_table(reg.modules))
    elif options and as_json:
        click.echo(json.dumps(reports.plugin_options_json(reg.entries()), indent=2, default=repr))
    elif options:
        console.print(reports.plugin_options_table(reg.entries()))
    elif as_json:
        click.echo(json.dumps([e.as_dict() for e in reg.entries()], indent=2))
    else:
        console.print(reports.plugins_table(reg.entries(), reg.failed()))


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the presets as JSON.")
def presets(as_json):
    """List the presets (recipes from the course's reports among them) with their trainable parameters."""
    from vlcap.apps.training import preset_summaries
    from vlcap.core.model.peft import MAX_TRAINABLE
    rows = preset_summaries(registry())
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        console.print(reports.presets_table(rows, MAX_TRAINABLE))


def train_flag(*decls, **attrs):
    return config_flag(TRAIN_FLAGS, *decls, **attrs)


@main.command()
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML run config.")
@click.option("--preset", type=click.Choice(sorted(config_lib.PRESETS)), default="full", show_default=True,
              help="'tiny': test ViT + random 2-layer GPT-2, runs offline in minutes; recipes from the course "
                   "reports: see `vlcap presets`.")
@train_flag("--connector", help="How the image reaches the decoder: cross-attention or visual-tokens (see "
           "`vlcap list-plugins`); options with --set connector.options.KEY=VALUE.")
@train_flag("--peft", help="PEFT method (see `vlcap list-plugins`); none: the connector alone trains.")
@train_flag("--encoder", help="timm ViT name, e.g. vit_large_patch14_clip_224.openai.")
@train_flag("--decoder-weights", type=click.Path(dir_okay=False), help="The course's decoder_model.bin.")
@train_flag("--train-json", type=click.Path(dir_okay=False),
            help="Training captions: COCO-style JSON (images + annotations), e.g. the course's train.json.")
@train_flag("--train-images", type=click.Path(file_okay=False), help="Folder of the --train-json images.")
@train_flag("--val-json", type=click.Path(dir_okay=False),
            help="Validation captions (COCO-style JSON) for the loss and metrics after each epoch; "
                 "none: no validation.")
@train_flag("--val-images", type=click.Path(file_okay=False), help="Folder of the --val-json images.")
@click.option("--out", type=click.Path(file_okay=False), help="Run directory (checkpoints, config, history).")
@train_flag("--epochs", type=int, help="Passes over the training data (--max-steps may stop earlier). With "
            "--resume: a new, longer length for the run (the cosine schedule is re-planned over the new total).")
@train_flag("--max-steps", type=int, help="Stop after this many optimizer steps. With --resume: a new, longer "
            "length for the run (the cosine schedule is re-planned over the new total).")
@train_flag("--batch-size", type=int,
            help="Captions per batch, over all processes (an optimizer step takes train.grad_accum batches).")
@train_flag("--lr", type=float, help="Peak learning rate: reached after train.warmup_steps, then cosine decay.")
@train_flag("--device", help=DEVICE_HELP)
@click.option("--set", "assignments", multiple=True, metavar="KEY=VALUE",
              help="Override any config key, e.g. --set peft.options.r=16 (repeatable).")
@click.option("--dry-run", is_flag=True, help="Build the model (shapes only), print parameter counts, exit.")
@click.option("--overwrite", is_flag=True,
              help="Replace the run already in --out (its resume state and checkpoints) instead of refusing.")
@train_flag("--feature-cache", type=click.Path(file_okay=False),
            help="Train from this cache of the encoder's tokens (see `vlcap cache-features`).")
@train_flag("--cache-features", is_flag=True, default=None,
            help="Build the feature cache first (at --feature-cache, default OUT/feature_cache) unless it exists.")
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False),
              help="Continue the stopped run in this directory with its own config.yaml; only --device, --lr "
                   "(a new peak learning rate, e.g. after a NaN stop), and --epochs/--max-steps to extend a "
                   "stopped or finished run, may be given too.")
@train_flag("--init-from", type=click.Path(dir_okay=False),
            help="Start a new run from this checkpoint's trainable weights (same PEFT method and shapes); "
                 "optimizer and schedule start fresh.")
@click.pass_context
def train(ctx, config_file, preset, out, assignments, dry_run, overwrite, resume_dir, **flags):
    """Train a captioner: only the connector (projection, cross-attention) and PEFT parameters learn."""
    checked_device(flags["device"])
    from vlcap.apps import training
    if resume_dir:
        refuse_options_on_resume(ctx, resume_dir)
        resumable = {name: value for name, value in flags.items() if TRAIN_FLAGS[name] in RESUMABLE_KEYS}
        overrides = config_overrides(resumable, TRAIN_FLAGS).get("train", {})
        print_training(training.resume_training(resume_dir, registry(), overrides, console=err_console))
        return
    cfg = config_lib.resolve(preset, config_file,
                             [config_overrides(flags, TRAIN_FLAGS), config_lib.parse_set(assignments)])
    if dry_run:
        training.dry_run(cfg, registry(), console)
        return
    if not out:
        raise VlcapError("no run directory: pass --out DIR")
    from vlcap.core.train import trainer
    print_training(trainer.train(cfg, out, registry(), console=err_console, overwrite=overwrite))


def refuse_options_on_resume(ctx, resume_dir):
    """``--resume`` continues a run with its own config.yaml: any option given on the command line
    besides --resume and the flags of ``RESUMABLE_KEYS`` is an error naming them."""
    kept = {"resume_dir", *(name for name, key in TRAIN_FLAGS.items() if key in RESUMABLE_KEYS)}
    given = [p.opts[0] for p in ctx.command.params if p.name not in kept
             and ctx.get_parameter_source(p.name) == click.core.ParameterSource.COMMANDLINE]
    if given:
        raise VlcapError(f"--resume continues {resume_dir} with its own config.yaml; drop {', '.join(given)}")


def print_training(result):
    """The trainer's result in one line, printed by the main process only."""
    from vlcap.core.train.distributed import is_main_process
    if is_main_process():
        say(console, f"trained {result.steps} steps; {result.saved:,} parameters saved to {result.best_checkpoint} "
                     f"(best) and {result.last_checkpoint} (last)")


@main.command("cache-features")
@click.option("--images", "image_dir", required=True, type=click.Path(file_okay=False), help="Folder of images to encode.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Cache directory to create.")
@config_flag(CACHE_FEATURES_FLAGS, "--encoder", help="timm ViT name (default: the --config file's, else the preset's).")
@click.option("--preset", type=click.Choice(sorted(config_lib.PRESETS)), default="full", show_default=True,
              help="Resolve the encoder as `vlcap train --preset` does.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML run config (as for train).")
@click.option("--set", "assignments", multiple=True, metavar="KEY=VALUE", help="Config override, as for train.")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True,
              help="Precision the tokens are stored in.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True, help="Images per encoder pass.")
@click.option("--device", default="auto", show_default=True, help=DEVICE_HELP)
def cache_features(image_dir, out, preset, config_file, assignments, dtype, batch_size, device, **flags):
    """Run the frozen encoder over every image in a folder once; `train --feature-cache` reads the tokens."""
    device = checked_device(device)
    cfg = config_lib.resolve(preset, config_file,
                             [config_overrides(flags, CACHE_FEATURES_FLAGS), config_lib.parse_set(assignments)])
    from vlcap.apps.training import cache_encoder_features
    cache = cache_encoder_features(cfg, image_dir, out, dtype=dtype, batch_size=batch_size, device=device,
                                   console=err_console)
    say(console, f"cached {len(cache.rows):,} images -> {cache.path}")


@main.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path())
@click.option("--by", help="Sort by this history key (default: the selection metric most runs use, e.g. cider).")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False), help="Also write the rows to this CSV.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False),
              help="Also draw loss and metric curves per epoch of every run into this PNG.")
def compare(run_dirs, by, as_json, csv_path, plot_path):
    """Compare training runs: one row per RUN_DIR, best first, and their curves."""
    from vlcap.apps import compare as compare_lib
    comparison = compare_lib.compare_runs(run_dirs, registry(), by=by)
    rows = compare_lib.comparison_rows(comparison)
    if csv_path:
        compare_lib.write_comparison_csv(csv_path, comparison)
    if plot_path:
        compare_lib.plot_curves(plot_path, comparison)
    if as_json:
        click.echo(json.dumps({"sorted_by": comparison.metric, "runs": rows}, indent=2))
        return
    console.print(reports.runs_table(comparison, rows))
    for path, what in ((csv_path, "rows"), (plot_path, "curves")):
        if path:
            console.print(f"{what}: {path}", markup=False, highlight=False)


@main.command()
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the metadata and tensors as JSON.")
def inspect(checkpoint, as_json):
    """Show what a vlcap checkpoint holds."""
    from vlcap.apps.inspection import inspect_checkpoint
    summary = inspect_checkpoint(checkpoint)
    if as_json:
        click.echo(json.dumps(reports.checkpoint_json(summary), indent=2))
    else:
        console.print(reports.checkpoint_report(summary))


@main.command()
@click.option("--out", type=click.Path(file_okay=False), default="vlcap-demo", show_default=True,
              help="Folder for the synthetic data, the runs and the decoder.")
@click.option("--steps", type=int, default=300, show_default=True, help="Training steps per run (connector x method).")
@click.option("--peft", "methods", multiple=True, help="Only these methods (default: every installed one).")
@click.option("--connector", "connectors", multiple=True,
              help="Only these connectors (default: every installed one: cross-attention and visual-tokens).")
def demo(out, steps, methods, connectors):
    """Train every PEFT method under every connector on a synthetic shapes set with the tiny preset, offline."""
    from vlcap.apps.demo import run_demo
    run_demo(Path(out), registry(), console, steps=steps, methods=methods or None, connectors=connectors or None)


@main.command()
@click.argument("images_dir", type=click.Path())
@click.option("--labels", "labels_file", type=click.Path(), help="id2label.json: {\"0\": \"bicycle\", ...} (zero-shot).")
@click.option("--classifier", type=click.Path(dir_okay=False),
              help="Classify with a ViT fine-tuned by train-classifier (RUN/best.safetensors) instead of CLIP zero-shot.")
@click.option("--out", type=click.Path(dir_okay=False), help="Write predictions here as 'filename,label' CSV.")
@click.option("--template", "templates", multiple=True, metavar="TEXT",
              help="Prompt with {object} for the class name, written with spaces for underscores "
                   "(repeatable; several are ensembled). "
                   "Default: CLIP's 18 CIFAR prompts.")
@click.option("--clip-model", help="OpenAI CLIP name or local OpenAI-format file (default: $VLCAP_CLIP_MODEL, else ViT-L/14).")
@click.option("--report", is_flag=True, help="Print the accuracy of each template and of their ensemble.")
@click.option("--ground-truth", type=click.Path(dir_okay=False),
              help="'filename,label' CSV for --report (default: the class id prefix of {class}_{n}.png names).")
@click.option("--plot-top5", type=int, metavar="N", help="Save top-5 bar charts for N sampled images into --out-dir.")
@click.option("--out-dir", type=click.Path(file_okay=False), help="Folder for the --plot-top5 PNGs.")
@click.option("--seed", type=int, default=0, show_default=True, help="Which images --plot-top5 samples.")
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True, help="Images per CLIP pass.")
@click.option("--device", default="auto", show_default=True, help=DEVICE_HELP)
@click.option("--skip-bad-images", is_flag=True, help="Classify the readable images instead of failing on unreadable ones.")
@precision_option(CLIP_PRECISION)
def classify(images_dir, labels_file, out, templates, report, plot_top5, out_dir, device, classifier, precision,
             **options):
    """Zero-shot classification of the images in IMAGES_DIR with CLIP and text prompts (or, with
    --classifier, with a fine-tuned ViT)."""
    # options: clip_model, ground_truth, seed, batch_size, skip_bad_images, as run_classification takes them
    device = checked_device(device)
    if classifier:
        refuse_given({"--precision": None if precision == "auto" else precision},
                     "sets CLIP's precision; --classifier runs the fine-tuned ViT as trained")
        return classify_with_classifier(images_dir, classifier, out, report, device, labels_file=labels_file,
                                        templates=templates, plot_top5=plot_top5, out_dir=out_dir, **options)
    if not labels_file:
        raise VlcapError("pass --labels id2label.json (zero-shot CLIP) or --classifier RUN/best.safetensors")
    from vlcap.apps.classify import run_classification
    result = run_classification(images_dir, labels_file, templates, out=out, report=report, plot_top5=plot_top5,
                                out_dir=out_dir, device=device, console=err_console, precision=precision, **options)
    if out:
        say(err_console, f"{len(result.files)} predictions written to {out}")
    if report:
        console.print(reports.classification_table(result))
    if plot_top5:
        say(err_console, f"top-5 plots of {result.plotted} images written to {out_dir}")


# Evaluate's flags that set an option of the CLIPScore metric (kept from before metrics were
# plugins); they apply when CLIPScore is scored.
EVALUATE_FLAGS = {"clip_model": "clipscore.model", "batch_size": "clipscore.batch_size", "precision": "clipscore.precision"}


def classify_with_classifier(images_dir, checkpoint, out, report, device, *, ground_truth, batch_size,
                             skip_bad_images, seed, **zero_shot):
    from vlcap.apps import classifier
    classifier.check_zero_shot_options(zero_shot)
    result = classifier.classify_with_classifier(images_dir, checkpoint, out=out, report=report,
                                                 ground_truth=ground_truth, batch_size=batch_size, device=device,
                                                 skip_bad_images=skip_bad_images, console=err_console)
    for message in result.bad:
        err_console.print(f"  unreadable: {message}", markup=False, highlight=False, soft_wrap=True)
    if out:
        err_console.print(f"{len(result.files)} predictions written to {out}", markup=False, highlight=False)
    if result.accuracy:
        correct, total = result.accuracy
        console.print(f"accuracy {100 * correct / total:.2f}% ({correct}/{total})", markup=False, highlight=False)


CLASSIFIER_FLAGS = {
    "val": "data.val_dir", "labels": "data.labels", "encoder": "model.encoder", "pretrained": "model.pretrained",
    "img_size": "model.img_size", "method": "model.method", "optimizer": "train.optimizer", "epochs": "train.epochs",
    "max_steps": "train.max_steps", "batch_size": "train.batch_size", "lr": "train.lr", "device": "train.device",
}


@main.command("train-classifier")
@click.argument("train_dir", required=False, type=click.Path(file_okay=False))
@click.option("--val", type=click.Path(file_okay=False), help="Validation images (accuracy each epoch picks best.safetensors).")
@click.option("--labels", type=click.Path(dir_okay=False),
              help="'filename,label' CSV for images not named {class}_{n}.ext (covers both folders).")
@click.option("--encoder", help="timm ViT name. [default: vit_base_patch16_224]")
@click.option("--pretrained/--no-pretrained", default=None, help="Start from timm's pretrained weights. [default: on]")
@click.option("--img-size", type=int, help="Input size in pixels (position embeddings resampled). [default: the model's]")
@click.option("--method", type=click.Choice(config_lib.CLASSIFIER_METHODS),
              help="What trains: every weight, the new head only (linear probe), or LoRA on q/v + head. [default: full]")
@click.option("--optimizer", type=click.Choice(config_lib.CLASSIFIER_OPTIMIZERS),
              help="AdamW, or SAM around AdamW (two passes per step; train.sam_rho). [default: adamw]")
@click.option("--out", type=click.Path(file_okay=False), help="Run directory (checkpoints, config, history).")
@click.option("--epochs", type=int, help="Passes over the training images. [default: 10]")
@click.option("--max-steps", type=int, help="Stop after this many optimizer steps.")
@click.option("--batch-size", type=int, help="Images per step, over all processes. [default: 32]")
@click.option("--lr", type=float, help="Peak learning rate (warm-up, then cosine decay). [default: 1e-4]")
@click.option("--device", help=DEVICE_HELP)
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML classifier config.")
@click.option("--set", "assignments", multiple=True, metavar="KEY=VALUE",
              help="Override any config key, e.g. --set train.sam_rho=0.1 (repeatable).")
@click.option("--overwrite", is_flag=True, help="Replace the run already in --out instead of refusing.")
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False),
              help="Continue the stopped run in this directory; only --device, --lr and --epochs/--max-steps "
                   "may be given too.")
@click.pass_context
def train_classifier(ctx, train_dir, out, config_file, assignments, overwrite, resume_dir, **flags):
    """Fine-tune a timm ViT as a classifier of the images in TRAIN_DIR (named {class}_{n}.ext)."""
    if flags["device"]:
        checked_device(flags["device"])
    from vlcap.apps import classifier
    if resume_dir:
        resumable = [name for name, key in CLASSIFIER_FLAGS.items() if key in RESUMABLE_KEYS]
        kept = {"resume_dir", *resumable}
        given = [p.opts[0] for p in ctx.command.params if p.name not in kept
                 and ctx.get_parameter_source(p.name) == click.core.ParameterSource.COMMANDLINE]
        if given:
            raise VlcapError(f"--resume continues {resume_dir} with its own config.yaml; drop {', '.join(given)}")
        overrides = config_overrides({k: flags[k] for k in resumable}, CLASSIFIER_FLAGS)
        print_classifier(classifier.resume(resume_dir, overrides.get("train", {}), console=err_console))
        return
    data = {"data": {"train_dir": train_dir}} if train_dir else {}
    cfg = classifier.classifier_config(config_file, [data, config_overrides(flags, CLASSIFIER_FLAGS),
                                                     config_lib.parse_set(assignments)])
    print_classifier(classifier.train(cfg, out, console=err_console, overwrite=overwrite))


def print_classifier(result):
    from vlcap.core.train.distributed import is_main_process
    if is_main_process():
        best = result.best or {}
        accuracy = f", validation accuracy {100 * best['val_accuracy']:.2f}%" if "val_accuracy" in best else ""
        console.print(f"trained {result.steps} steps; best (epoch {best.get('epoch', '?')}{accuracy}) saved to "
                      f"{result.best_checkpoint}, last to {result.last_checkpoint}", markup=False, highlight=False)


@main.command("vit-maps")
@click.argument("images", nargs=-1, type=click.Path())
@click.option("--encoder", help="timm ViT name (pretrained weights unless --no-pretrained).")
@click.option("--checkpoint", type=click.Path(dir_okay=False),
              help="A vlcap checkpoint: a classifier's fine-tuned ViT, or the encoder a captioner was trained on.")
@click.option("--pretrained/--no-pretrained", default=True, show_default=True, help="With --encoder: timm's pretrained weights.")
@click.option("--out-dir", required=True, type=click.Path(file_okay=False), help="Folder for the PNGs (and .npz).")
@click.option("--layer", type=int, default=-1, show_default=True, help="ViT block whose attention is drawn (negative: from the last).")
@click.option("--query", type=click.Choice(["cls", "mean"]), default="cls", show_default=True,
              help="Attention of the [class] token, or the mean over the patch queries (models without one).")
@click.option("--save-npz", is_flag=True, help="Also write the raw arrays (pos-embed.npz, STEM_cls-attention.npz).")
@click.option("--device", default="auto", show_default=True, help=DEVICE_HELP)
def vit_maps(images, out_dir, device, **options):
    """pos-embed.png (position-embedding similarity) and STEM_cls-attention.png for each of IMAGES."""
    device = checked_device(device)
    from vlcap.apps.vit_maps import draw_vit_maps
    result = draw_vit_maps(images, out_dir, device=device, **options)
    if result.pos_embed_png:
        console.print(f"{result.pos_embed_png}: position embedding similarity of {result.model}", markup=False,
                      highlight=False, soft_wrap=True)
    else:
        err_console.print(f"no pos-embed.png: {result.note}", markup=False, highlight=False, soft_wrap=True)
    for png in result.attention_pngs:
        console.print(f"{png}", markup=False, highlight=False, soft_wrap=True)
    for npz in result.npz:
        console.print(f"{npz}", markup=False, highlight=False, soft_wrap=True)


@main.command()
@click.option("--pred", "pred_path", required=True, type=click.Path(dir_okay=False),
              help="Predictions: a JSON object, image file stem -> caption (the course's format).")
@click.option("--annotations", "annotations_path", required=True, type=click.Path(dir_okay=False),
              help="The reference captions (COCO-style JSON, e.g. val.json).")
@click.option("--images", "image_dir", type=click.Path(file_okay=False), help="The images, for CLIPScore.")
@click.option("--metric", "metrics", multiple=True, metavar="NAME",
              help="Score with this metric plugin (repeatable; see `vlcap list-plugins`). "
                   "Default: cider and clipscore.")
@click.option("--set", "assignments", multiple=True, metavar="METRIC.KEY=VALUE",
              help="A metric option, e.g. --set clipscore.model=ViT-L/14 (repeatable; `vlcap list-plugins "
                   "--options` lists them).")
@click.option("--no-clipscore", is_flag=True, help="Leave CLIPScore out (CIDEr alone: no images or CLIP model needed).")
@click.option("--clip-model", help="OpenAI CLIP name (ViT-B/32, ViT-L/14, ...) or a local OpenAI-format "
              "checkpoint; default $VLCAP_CLIP_MODEL, else ViT-B/32 as the course (--set clipscore.model=...).")
@click.option("--batch-size", type=click.IntRange(min=1), help="CLIP batch size (--set clipscore.batch_size=...).")
@click.option("--per-image", "per_image_path", type=click.Path(dir_okay=False),
              help="Write every metric's per-image scores to this CSV (best first by --rank-by).")
@click.option("--rank-by", metavar="NAME", help="The metric that ranks images (default: clipscore if scored, "
              "else the first --metric).")
@click.option("--top-k", type=click.IntRange(min=0), default=5, show_default=True,
              help="Show the K best and K worst images by the --rank-by metric.")
@click.option("--json", "as_json", is_flag=True, help="Print the scores as JSON.")
@precision_option(CLIP_PRECISION)
def evaluate(pred_path, annotations_path, image_dir, metrics, assignments, no_clipscore, per_image_path, rank_by,
             top_k, as_json, **flags):
    """Score captions with metric plugins; CIDEr and CLIPScore exactly as the course's evaluator does."""
    from vlcap.apps.evaluation import evaluate_predictions, metric_choice
    options = config_lib.parse_set(assignments)
    if "clipscore" in metric_choice(metrics, no_clipscore):
        options = config_lib.merge(options, config_overrides(flags, EVALUATE_FLAGS))
    with err_console.status("scoring"):  # a spinner on a terminal; nothing when stderr is not one
        result = evaluate_predictions(pred_path, annotations_path, registry(), image_dir, metrics=metrics,
                                      options=options, no_clipscore=no_clipscore, rank_by=rank_by,
                                      per_image_path=per_image_path)
    for note in reports.evaluation_notes(result):
        err_console.print(note, soft_wrap=True)
    if as_json:
        click.echo(json.dumps(reports.evaluation_json(result), indent=2))
        return
    console.print(reports.evaluation_tables(result, pred_path, annotations_path, top_k))
    if per_image_path:
        say(console, f"per-image scores: {per_image_path}")


def checkpoint_options(command):
    """--checkpoint and --decoder-weights, for the commands that load a trained captioner."""
    command = click.option("--decoder-weights", type=click.Path(dir_okay=False),
                           help="decoder_model.bin (default: the path the checkpoint recorded).")(command)
    return click.option("--checkpoint", type=click.Path(dir_okay=False),
                        help="A checkpoint from `vlcap train` (or --hf-model instead).")(command)


def hf_options(command):
    """--hf-model and its --prompt, --quantize, --first-sentence: a pretrained transformers model
    instead of a checkpoint (vlcap.apps.hf_captioning)."""
    for option in reversed([
            click.option("--hf-model", help="A pretrained transformers image-text-to-text model instead of --checkpoint: "
                         "hub id (e.g. llava-hf/llava-1.5-7b-hf) or local folder; needs pip install \"vlcap[hf]\"."),
            click.option("--prompt", "prompts", multiple=True, metavar="TEXT",
                         help="--hf-model's instruction, put with the image through its chat template (caption: "
                              "repeat to compare prompts). --set takes transformers' GenerationConfig keys there."),
            click.option("--quantize", type=click.Choice(["4bit", "8bit"]),
                         help="--hf-model in 4-/8-bit weights (bitsandbytes, CUDA only).")]):
        command = option(command)
    return command


def comparison_options(command):
    """caption --hf-model's settings grid, --out-dir, --report and what it scores against."""
    for option in reversed([
            click.option("--first-sentence", is_flag=True, help="--hf-model: keep the answer's first sentence only."),
            click.option("--grid", "grid_file", type=click.Path(dir_okay=False),
                         help="--hf-model: a YAML grid of settings to compare (prompt: [...], num_beams: [1, 2], ...) "
                              "instead of --prompt/--set."),
            click.option("--out-dir", type=click.Path(file_okay=False),
                         help="--hf-model with several settings or --report: one setting-N.json per setting, "
                              "settings.json, report.json/.csv."),
            click.option("--report", is_flag=True, help="--hf-model: score every setting (CIDEr, CLIPScore) against "
                         "--annotations and tabulate them."),
            click.option("--annotations", "annotations_path", type=click.Path(dir_okay=False),
                         help="--report: the reference captions (COCO-style JSON); its images are the ones captioned."),
            click.option("--images", "image_dir", type=click.Path(file_okay=False),
                         help="--report: the folder of the annotated images (default IMAGES_DIR)."),
            click.option("--clip-model", help="--report: CLIP for CLIPScore, as for evaluate.")]):
        command = option(command)
    return command


# caption's options that only --hf-model takes, by parameter name.
HF_ONLY_FLAGS = {"prompts": "--prompt", "quantize": "--quantize", "first_sentence": "--first-sentence",
                 "grid_file": "--grid", "out_dir": "--out-dir", "report": "--report",
                 "annotations_path": "--annotations", "image_dir": "--images", "clip_model": "--clip-model"}


def refuse_given(given, reason):
    """One line naming the options in ``given`` (flag -> value) that were set but ``reason``
    makes meaningless."""
    set_flags = [flag for flag, value in given.items() if value not in (None, False, ())]
    if set_flags:
        raise VlcapError(f"{', '.join(set_flags)}: {reason}")


def model_source(checkpoint, hf_model):
    """Exactly one of --checkpoint and --hf-model."""
    if bool(checkpoint) == bool(hf_model):
        raise VlcapError("pass --checkpoint CKPT (a vlcap checkpoint) or --hf-model MODEL (a pretrained transformers "
                         "model), one of them")


def decoding_options(command):
    """--decoding, --num-beams, --max-length and --set, for the commands that generate captions."""
    for option in reversed([
            click.option("--decoding", "strategy", help="Decoding strategy (default: the checkpoint's; see `vlcap list-plugins`)."),
            click.option("--num-beams", type=int,
                         help="Beam search with N beams: --decoding beam --set num_beams=N (whatever the "
                              "checkpoint's default; refused beside another --decoding)."),
            click.option("--max-length", type=int, help="Most tokens per caption (default: the checkpoint's decoding.max_length)."),
            click.option("--set", "assignments", multiple=True, metavar="KEY=VALUE",
                         help="A decoding strategy option, e.g. --set length_penalty=0.8 or min_length=3 (repeatable); "
                              "with --hf-model a GenerationConfig key, e.g. --set max_new_tokens=30.")]):
        command = option(command)
    return command


def decoding_request(strategy, assignments, num_beams):
    """``(strategy, options)`` from --decoding, --set KEY=VALUE and the shortcut flags of
    ``DECODING_FLAGS`` (a flag wins over --set). A shortcut picks its strategy
    (``SHORTCUT_STRATEGIES``) whatever the checkpoint's default, so --num-beams means beam search
    everywhere; beside a --decoding naming another strategy it is one ``VlcapError`` line rather
    than options the chosen strategy would refuse."""
    shortcuts = {"num_beams": num_beams}
    for name, value in shortcuts.items():
        implied = SHORTCUT_STRATEGIES[name]
        if value is None or strategy == implied:
            continue
        flag = f"--{name.replace('_', '-')}"
        if strategy is not None:
            raise VlcapError(f"{flag} {value} means --decoding {implied}, not --decoding {strategy}; drop one of them")
        strategy = implied
    options = config_lib.merge(config_lib.parse_set(assignments), config_overrides(shortcuts, DECODING_FLAGS))
    return strategy, options


@main.command()
@click.argument("images_dir", type=click.Path(file_okay=False))
@checkpoint_options
@hf_options
@click.option("--out", type=click.Path(dir_okay=False), help="Predictions JSON {file stem: caption}.")
@decoding_options
@comparison_options
@click.option("--batch-size", type=click.IntRange(min=1), help="Images per decoding batch (default 32; 8 with --hf-model).")
@click.option("--device", default="auto", show_default=True, help=DEVICE_HELP)
@click.option("--skip-bad-images", is_flag=True, help="Leave unreadable images out and exit 0.")
@precision_option(CAPTIONER_PRECISION)
@click.option("--merge", is_flag=True, help="Fold the PEFT method into the frozen weights once before decoding: "
              "the same captions, faster (methods that can merge: LoRA, ...).")
def caption(images_dir, checkpoint, decoder_weights, out, strategy, num_beams, max_length, assignments,
            batch_size, device, skip_bad_images, precision, merge, hf_model, **hf):
    """Caption every jpg/jpeg/png/webp image in IMAGES_DIR into a {file stem: caption} JSON, with a
    trained checkpoint or a pretrained transformers model (--hf-model; several --prompt/--set: compare them)."""
    # hf: hf_options' and comparison_options' values, for --hf-model
    device = checked_device(device)
    model_source(checkpoint, hf_model)
    if hf_model:
        refuse_given({"--decoder-weights": decoder_weights, "--decoding": strategy, "--max-length": max_length,
                      "--merge": merge or None, "--precision": None if precision == "auto" else precision},
                     "these are a checkpoint's; with --hf-model use --set (e.g. --set max_new_tokens=30)")
        settings = [*assignments, *([f"num_beams={num_beams}"] if num_beams is not None else [])]
        bad_images, written = caption_hf(images_dir, hf_model, out, settings, batch_size or 8, device, **hf)
    else:
        refuse_given({HF_ONLY_FLAGS[name]: value for name, value in hf.items()}, "these go with --hf-model")
        if not out:
            raise VlcapError("no prediction file: pass --out pred.json")
        from vlcap.core.infer.captioning import caption_folder
        strategy, options = decoding_request(strategy, assignments, num_beams)
        result = caption_folder(images_dir, checkpoint, out, registry(), decoder_weights=decoder_weights,
                                merge=merge, strategy=strategy, options=options, max_length=max_length,
                                batch_size=batch_size or 32, device=device, precision=precision,
                                console=err_console)
        bad_images, written = result.bad_images, out
        say(console, f"wrote {len(result.predictions)} captions to {out}")
    for message in bad_images:
        say(err_console, f"  unreadable: {message}")
    if bad_images and not skip_bad_images:
        raise VlcapError(f"{len(bad_images)} unreadable image(s) listed above have no caption in {written}; "
                         "fix or remove them, or pass --skip-bad-images")


def caption_hf(images_dir, model, out, assignments, batch_size, device, *, prompts, quantize, first_sentence,
               grid_file, out_dir, report, annotations_path, image_dir, clip_model):
    """`caption --hf-model`: one setting into --out, or several (and --report) into --out-dir.
    Returns (unreadable image messages, where the captions went)."""
    from vlcap.apps import hf_comparison
    settings = hf_comparison.settings_grid(prompts, assignments, grid_file)
    hf_comparison.check_outputs(settings, out, out_dir, report, annotations_path, image_dir, clip_model)
    if len(settings) == 1 and not report:
        from vlcap.apps.hf_captioning import caption_folder_with_hf
        setting, = settings
        result = caption_folder_with_hf(images_dir, model, out, setting.prompt, setting.options, device=device,
                                        quantize=quantize, first_sentence=first_sentence, batch_size=batch_size,
                                        console=err_console)
        say(console, f"wrote {len(result.predictions)} captions to {out}")
        return result.bad_images, out
    comparison = hf_comparison.compare_settings(
        images_dir, model, out_dir, settings, device=device, quantize=quantize, first_sentence=first_sentence,
        batch_size=batch_size, annotations_path=annotations_path, image_dir=image_dir, clip_model=clip_model,
        console=err_console)
    console.print(reports.comparison_table(comparison))
    return comparison.bad_images, out_dir


@main.command()
@click.argument("images", nargs=-1, type=click.Path())
@checkpoint_options
@hf_options
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
@click.option("--device", default="auto", show_default=True, help=DEVICE_HELP)
@precision_option(CAPTIONER_PRECISION + " --rank-by's CLIP: as `vlcap evaluate --precision`.")
def visualize(images, checkpoint, out_dir, strategy, num_beams, assignments, device, hf_model, prompts, quantize,
              precision, **options):
    """Draw each generated word's attention over the image (the cross-attention, or with the visual-tokens
    connector the self-attention to the image tokens): one PNG per image in OUT_DIR (with --hf-model: the
    answer's attention to the image tokens)."""
    # options: draw_attention_maps's keywords (decoder weights, drawing, --rank-by choice), by name
    device = checked_device(device)
    model_source(checkpoint, hf_model)
    if hf_model:
        refuse_given({"--decoder-weights": options.pop("decoder_weights"), "--decoding": strategy,
                      "--max-length": options.pop("max_length"), "--precision": None if precision == "auto" else precision},
                     "these are a checkpoint's; with --hf-model use --set (e.g. --set max_new_tokens=30)")
        if len(prompts) > 1:
            raise VlcapError("visualize draws one prompt's answer: give --prompt once")
        from vlcap.apps.hf_attention import draw_hf_attention_maps
        from vlcap.apps.hf_comparison import parse_assignments
        settings = [*assignments, *([f"num_beams={num_beams}"] if num_beams is not None else [])]
        generation = {key: values[-1] for key, values in parse_assignments(settings).items()}
        drawn = draw_hf_attention_maps(images, hf_model, out_dir, prompts[0] if prompts else None, generation,
                                       device=device, quantize=quantize, console=err_console, **options)
    else:
        refuse_given({"--prompt": prompts, "--quantize": quantize}, "these go with --hf-model")
        strategy, decoding = decoding_request(strategy, assignments, num_beams)
        from vlcap.apps.visualize import draw_attention_maps
        drawn = draw_attention_maps(images, checkpoint, out_dir, registry(), device=device, strategy=strategy,
                                    options=decoding, precision=precision, console=err_console, **options)
    for figure in drawn:
        panels = f"{figure.panels} panel{'s' * (figure.panels != 1)}"
        note = f" ({figure.note})" if figure.note else ""
        say(console, f"{figure.png}: {panels}, \"{figure.caption}\"{note}")



@main.command()
@click.argument("run_dir", required=False, type=click.Path(file_okay=False))
@click.option("--predictions", "predictions_path", type=click.Path(dir_okay=False),
              help="Report on these captions ({stem: caption} JSON, e.g. zero-shot) instead of the run's own.")
@click.option("--images", "image_dir", required=True, type=click.Path(file_okay=False), help="The annotated images.")
@click.option("--annotations", "annotations_path", required=True, type=click.Path(dir_okay=False),
              help="The reference captions (COCO-style JSON, e.g. val.json).")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Report folder to write (index.html and its images); an earlier report there is replaced.")
@click.option("--checkpoint", type=click.Path(dir_okay=False), help="Caption with this checkpoint (default: RUN_DIR/best.safetensors).")
@click.option("--decoder-weights", type=click.Path(dir_okay=False),
              help="decoder_model.bin (default: the path the checkpoint recorded).")
@decoding_options
@click.option("--top", type=click.IntRange(min=0), default=3, show_default=True,
              help="Best and worst images shown with their attention maps.")
@click.option("--no-clipscore", is_flag=True, help="CIDEr only (no CLIP model needed).")
@click.option("--clip-model", help="CLIP for CLIPScore, as for evaluate (default: $VLCAP_CLIP_MODEL, else ViT-B/32).")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True, help="Images per batch.")
@click.option("--device", default="auto", show_default=True, help=DEVICE_HELP)
def report(run_dir, predictions_path, image_dir, annotations_path, out, checkpoint, decoder_weights, strategy,
           num_beams, max_length, assignments, top, no_clipscore, clip_model, batch_size, device):
    """A static HTML report of a run's captions (or of a prediction file) on an annotated image set."""
    device = checked_device(device)
    strategy, options = decoding_request(strategy, assignments, num_beams)
    from vlcap.apps.html_report import ReportInputs, build_report
    inputs = ReportInputs(image_dir, annotations_path, run_dir, predictions_path, checkpoint, decoder_weights,
                          dict(strategy=strategy, options=options, max_length=max_length, batch_size=batch_size),
                          clipscore=not no_clipscore, clip_model=clip_model, top=top, batch_size=batch_size,
                          device=device)
    built = build_report(out, inputs, registry(), console=err_console)
    scores = ", ".join(f"{name} {value:.4f}" for name, value in built.scores.items())
    console.print(f"report of {len(built.images)} images ({scores}): {Path(out) / 'index.html'}", markup=False,
                  highlight=False)

if __name__ == "__main__":
    sys.exit(main())
