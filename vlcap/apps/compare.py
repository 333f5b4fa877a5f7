"""``vlcap compare``: what a set of run directories trained, side by side.

A run directory (``vlcap train --out``) holds ``config.yaml`` (the resolved config), ``history.jsonl``
(one record per finished epoch: losses, validation metrics, timings) and ``best``/``last``
checkpoints. Everything here reads those files as untrusted input: a folder that is not a run, a
damaged file or a record that is not numbers is one ``VlcapError`` naming the file. A run stopped
before its planned length, or one without a finished epoch, is still a row, marked as such; a run
that did not record a metric shows it as not recorded.
"""
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import yaml

from vlcap.core import config as config_lib
from vlcap.core.atomic import atomic_write
from vlcap.core.errors import VlcapError
from vlcap.core.model.captioner import build_captioner
from vlcap.core.model.peft import count_parameters
from vlcap.core.outputs import write_csv
from vlcap.core.train.trainer import TIMING_KEYS, best_metric_name

# History keys that are not validation metrics.
BOOKKEEPING_KEYS = ("epoch", "step", "train_loss", "lr", "val_loss", *TIMING_KEYS)
LOSSES = ("train_loss", "val_loss")  # lower is better; metrics say so themselves
DEFAULT_CONNECTOR = "cross-attention"  # what a run made before connectors were configurable used


@dataclass
class RunSummary:
    """One run directory, read."""
    name: str  # as given on the command line
    config: dict  # config.yaml, raw (a run from another vlcap version may have other keys)
    history: list  # history.jsonl's records
    connector: str
    peft: str  # the method and its non-default options, "lora r=16"
    encoder: str
    trainable: Optional[int]  # None: the config cannot be built here (another version or plugin)
    checkpoint: Optional[Path]  # best.safetensors, else last.safetensors, else None
    checkpoint_bytes: Optional[int]
    planned_epochs: Optional[int]
    status: str  # "finished", "interrupted (1/3 epochs)" or "no epoch finished"
    selection: str  # the history key the run chose its best checkpoint by
    metrics: list = field(default_factory=list)  # the validation metrics it recorded, in order
    best: Optional[dict] = None  # the record of its best epoch by the comparison's metric
    is_best: bool = False

    @property
    def interrupted(self):
        return self.status != "finished"

    def mean(self, key):
        """Mean of ``key`` over the epochs that recorded it (None: none did)."""
        values = [r[key] for r in self.history if key in r]
        return sum(values) / len(values) if values else None

    @property
    def seconds_per_epoch(self):
        """Training plus validation seconds per epoch (None for runs that did not record time)."""
        train = self.mean("epoch_seconds")
        return None if train is None else train + (self.mean("val_seconds") or 0.0)


def read_run_config(run_dir):
    path = Path(run_dir) / "config.yaml"
    if not Path(run_dir).is_dir():
        raise VlcapError(f"{run_dir}: run directory not found")
    if not path.is_file():
        raise VlcapError(f"{run_dir}: not a vlcap run directory (no config.yaml); pass folders written by "
                         "vlcap train --out")
    try:
        data = config_lib.read_yaml(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise VlcapError(f"{path}: not a readable YAML config ({str(exc).splitlines()[0]})") from None
    sections = ("model", "peft", "train", "data")
    if not isinstance(data, dict) or not all(isinstance(data.get(k, {}), dict) for k in sections):
        raise VlcapError(f"{path}: not a vlcap run config (expected model:, peft:, train:, data: mappings)")
    return data


def read_history(run_dir):
    """The records of ``history.jsonl`` ([] when the run has not finished an epoch), each with an
    ``epoch``, holding their numbers."""
    path = Path(run_dir) / "history.jsonl"
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise VlcapError(f"{path}:{number}: not a JSON record; the history is damaged") from None
        if not (isinstance(record, dict) and isinstance(record.get("epoch"), int)):
            raise VlcapError(f"{path}:{number}: a history record is a JSON object with an integer epoch")
        # numbers only: a field another vlcap version records as text is not a score to compare
        records.append({k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    return records


def peft_description(peft, registry):
    """The method and the options that differ from its defaults ("lora r=16 targets=[q, v, mlp]");
    every option when the plugin is not installed here."""
    method, options = str(peft.get("method", "?")), peft.get("options") or {}
    defaults = {}
    try:
        config_class = registry.get("peft", method).config_class
        defaults = config_lib.to_dict(config_class()) if config_class else {}
    except VlcapError:
        pass
    changed = [f"{key}={json.dumps(value).replace(',', ', ')}" if not isinstance(value, str) else f"{key}={value}"
               for key, value in (options.items() if isinstance(options, dict) else ())
               if key not in defaults or defaults[key] != value]
    return " ".join([method, *changed])


def trainable_count(config, registry):
    """Trainable parameters of the run's model, counted on a shapes-only build; None when this
    vlcap cannot build the config (another version's keys, a plugin not installed here)."""
    try:
        cfg = config_lib.from_dict(config_lib.RunConfig, config)
        return count_parameters(build_captioner(cfg, registry, meta=True).captioner).trainable
    except (VlcapError, TypeError, ValueError, KeyError):
        return None


def planned_epochs(train, history):
    """How many epochs the run was to train: ``train.epochs``, fewer when ``train.max_steps`` ends
    it earlier (steps per epoch from the first record)."""
    epochs = train.get("epochs")
    if not isinstance(epochs, int):
        return None
    max_steps = train.get("max_steps")
    if isinstance(max_steps, int) and history and history[0].get("step"):
        epochs = min(epochs, math.ceil(max_steps / history[0]["step"]))
    return epochs


def run_status(train, history, planned):
    if not history:
        return "no epoch finished"
    last = history[-1]
    max_steps = train.get("max_steps")
    all_epochs = planned is not None and last["epoch"] >= planned
    if all_epochs or (isinstance(max_steps, int) and last.get("step", 0) >= max_steps):
        return "finished"
    return f"interrupted ({last['epoch']}/{planned if planned is not None else '?'} epochs)"


def read_run(run_dir, registry):
    config = read_run_config(run_dir)
    history = read_history(run_dir)
    model, train, data = config.get("model", {}), config.get("train", {}), config.get("data", {})
    connector = config.get("connector")
    checkpoint = next((p for p in (Path(run_dir) / "best.safetensors", Path(run_dir) / "last.safetensors")
                       if p.is_file()), None)
    has_val = bool(data.get("val_json") and data.get("val_images"))
    metric_names = train.get("metrics") if isinstance(train.get("metrics"), list) else []
    selection = str(best_metric_name(SimpleNamespace(best_metric=str(train.get("best_metric", "auto")),
                                                     metrics=[str(m) for m in metric_names]), has_val))
    planned = planned_epochs(train, history)
    metrics = [k for k in dict.fromkeys(k for r in history for k in r) if k not in BOOKKEEPING_KEYS]
    return RunSummary(
        name=str(run_dir), config=config, history=history,
        connector=str(connector["name"]) if isinstance(connector, dict) and "name" in connector else DEFAULT_CONNECTOR,
        peft=peft_description(config.get("peft", {}), registry), encoder=str(model.get("encoder", "?")),
        trainable=trainable_count(config, registry), checkpoint=checkpoint,
        checkpoint_bytes=checkpoint.stat().st_size if checkpoint else None, planned_epochs=planned,
        status=run_status(train, history, planned), selection=selection, metrics=metrics)


def higher_is_better(name, registry):
    """Losses are lower-is-better; a metric says so itself (higher when it is not installed here)."""
    if name in LOSSES:
        return False
    try:
        return registry.get("metric", name).higher_is_better
    except VlcapError:
        return True


def best_record(history, key, higher):
    """The record with the best ``key`` (the earlier on a tie, as training selects); None if none has it."""
    best = None
    for record in history:
        if key in record and (best is None or (record[key] > best[key] if higher else record[key] < best[key])):
            best = record
    return best


@dataclass
class Comparison:
    runs: list  # RunSummary, best first
    metric: str  # what they are sorted by
    metrics: list  # every validation metric any run recorded


def compare_runs(run_dirs, registry, by=None):
    """Read each run directory and sort them by ``by`` (a history key; default the selection
    metric most of the runs use), best first; runs that did not record it follow in the given
    order. Each run's ``best`` is its best epoch by that key (by its own selection metric when it
    did not record it)."""
    if not run_dirs:
        raise VlcapError("no runs: pass one or more run directories (vlcap train --out)")
    runs = [read_run(d, registry) for d in run_dirs]
    selections = [r.selection for r in runs]
    metric = by or max(selections, key=selections.count)
    higher = higher_is_better(metric, registry)
    for run in runs:
        key = metric if any(metric in r for r in run.history) else run.selection
        run.best = best_record(run.history, key, higher_is_better(key, registry))
    recorded = [r for r in runs if r.best is not None and metric in r.best]
    if by and not recorded:
        raise VlcapError(f"--by {by}: none of the runs recorded it; they recorded "
                         f"{', '.join(dict.fromkeys(k for r in runs for rec in r.history for k in rec))}")
    recorded.sort(key=lambda r: -r.best[metric] if higher else r.best[metric])
    if recorded:
        recorded[0].is_best = True
    ordered = recorded + [r for r in runs if r not in recorded]
    return Comparison(ordered, metric, list(dict.fromkeys(m for r in runs for m in r.metrics)))


def comparison_rows(comparison):
    """One JSON-ready dict per run (the table's columns; None where a run has no value)."""
    rows = []
    for run in comparison.runs:
        best = run.best or {}
        rows.append({
            "run": run.name, "best": run.is_best, "status": run.status, "connector": run.connector,
            "peft": run.peft, "encoder": run.encoder, "trainable": run.trainable,
            "checkpoint": str(run.checkpoint) if run.checkpoint else None, "checkpoint_bytes": run.checkpoint_bytes,
            "epochs": len(run.history), "planned_epochs": run.planned_epochs, "best_epoch": best.get("epoch"),
            "selected_by": comparison.metric if comparison.metric in best else run.selection,
            "val_loss": best.get("val_loss"), **{m: best.get(m) for m in comparison.metrics},
            "seconds_per_epoch": run.seconds_per_epoch, "samples_per_s": run.mean("samples_per_s")})
    return rows


def write_comparison_csv(path, comparison):
    rows = comparison_rows(comparison)
    columns = list(rows[0])
    write_csv(path, columns, ([row[c] for c in columns] for row in rows))


def curve_keys(comparison):
    """The per-epoch numbers worth a panel: the losses, then every metric, in that order."""
    recorded = {k for r in comparison.runs for rec in r.history for k in rec}
    return [k for k in (*LOSSES, *comparison.metrics) if k in recorded]


def plot_curves(path, comparison):
    """Loss and metric curves per epoch, one panel per number, every run on the same axes (one
    colour per run across panels; an interrupted run dashed). Written atomically as a PNG.
    Returns the panels' keys."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    keys = curve_keys(comparison)
    if not keys:
        raise VlcapError("--plot: none of the runs finished an epoch, so there are no curves to draw")
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    figure = Figure(figsize=(4.2 * cols, 3.2 * rows + 0.8), layout="constrained")
    axes = figure.subplots(rows, cols, squeeze=False).ravel()
    for ax, key in zip(axes, keys):
        for index, run in enumerate(comparison.runs):
            points = [(r["epoch"], r[key]) for r in run.history if key in r]
            if points:
                ax.plot(*zip(*points), marker="o", color=f"C{index % 10}", linestyle="--" if run.interrupted else "-",
                        label=run.name + (f" ({run.status})" if run.interrupted else ""))
        ax.set_title(key)
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    for ax in axes[len(keys):]:
        ax.axis("off")
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncols=min(3, max(len(labels), 1)), fontsize=8)
    with atomic_write(path, "wb") as f:
        figure.savefig(f, format="png", dpi=100)
    return keys
