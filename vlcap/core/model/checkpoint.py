"""Trainable-only checkpoints as safetensors, with enough metadata to rebuild the model.

The file holds exactly the parameters with ``requires_grad`` (after the PEFT method's
``export``); the header holds the resolved run config, the plugin that made it and its package
version, the encoder name with the width and number of the feature tokens it gave, the tokenizer
fingerprint and the parameter count. Loading rebuilds the captioner from that metadata plus the
frozen decoder weights, and refuses any file whose encoder features, keys, shapes or count do not
match the model it describes.
"""
import dataclasses
import json
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

import vlcap
from vlcap.core import config as config_lib
from vlcap.core.atomic import atomic_write
from vlcap.core.model.course_weights import decoder_fingerprint
from vlcap.core.model.captioner import build_captioner, tokenizer_for
from vlcap.core.config import RunConfig, plugin_config
from vlcap.core.errors import VlcapError, VlcapWarning, few
from vlcap.core.plugins import plugin_call
from vlcap.core.model.peft import (check_budget, check_mergeable, config_dict, count_parameters, is_pretrained,
                                   merge_peft)
from vlcap.core.model.tokenizer import Tokenizer
from vlcap.core.plugins import KINDS

FORMAT = "vlcap.trainable.v1"
ENCODER_FEATURES = ("encoder_width", "encoder_tokens")
# What names in a checkpoint may look like (its metadata is untrusted): a plugin name, a
# distribution name as PEP 508 allows it, a version, and a plain timm model name (no ``hf-hub:``
# or ``local-dir:`` scheme, no path: a file must not choose where vlcap loads weights from).
PLUGIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,63}")
PACKAGE_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._\-]{0,98}[A-Za-z0-9])?")
VERSION = re.compile(r"[A-Za-z0-9.+!_\-]{1,64}")
TIMM_NAME = re.compile(r"[A-Za-z0-9_\-]{1,100}(\.[A-Za-z0-9_\-]{1,100})?")


@dataclass
class LoadedCaptioner:
    captioner: object
    tokenizer: Tokenizer
    config: RunConfig
    method: object
    metadata: dict


def save_checkpoint(path, captioner, method, cfg, tokenizer, registry, record=None):
    """Write the trainable parameters of ``captioner`` to ``path`` (atomically). ``record``: the
    training history record (epoch, step, losses, validation scores) the weights were saved at,
    kept in the metadata for ``vlcap inspect``. Returns the number of parameters saved."""
    if getattr(captioner, "merged", False):
        raise VlcapError(f"{path}: this captioner's PEFT method was merged into its base weights (for decoding "
                         "only); save the checkpoint it was loaded from instead")
    trainable = count_parameters(captioner).trainable
    check_budget(trainable, what=f"{path}: the model")
    with plugin_call(method, "export"):
        state, export_config = method.export(captioner, plugin_config(method, cfg.peft.options, "peft.options"))
    saved_cfg = dataclasses.replace(cfg, peft=dataclasses.replace(cfg.peft, options=config_dict(export_config)))
    count = sum(t.numel() for t in state.values())
    metadata = {
        "format": FORMAT,
        "config": json.dumps(config_lib.to_dict(saved_cfg)),
        "peft": plugin_record(registry.entry("peft", method.name)),
        "connector": plugin_record(registry.entry("connector", cfg.connector.name)),
        "encoder": cfg.model.encoder,
        # What the encoder built from the config gave (not in the config): the projection and the
        # cross-attention were trained on tokens of this width and number.
        "encoder_width": str(captioner.encoder.embed_dim),
        "encoder_tokens": str(captioner.encoder.num_tokens),
        # The frozen decoder the trainable parameters were trained on top of: another decoder of
        # the same size loads without error but turns the captions into noise.
        "decoder_fingerprint": decoder_fingerprint(captioner.decoder),
        "tokenizer": tokenizer.fingerprint,
        "parameters": str(count),
        "vlcap_version": vlcap.__version__,
    }
    if record is not None:
        metadata["training"] = json.dumps(record)
    trained_pretrained = pretrained_in(captioner, state)
    if trained_pretrained:  # for `vlcap inspect`: these tensors replace pretrained values on load
        metadata["trained_pretrained"] = json.dumps(trained_pretrained)
    tensors = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in state.items()}
    with atomic_write(path) as f:
        f.write(safetensors_bytes(tensors, metadata=metadata))
    return count


def pretrained_in(captioner, state):
    """The names in ``state`` that are pretrained parameters the method trains (its
    ``pretrained_to_train``), sorted."""
    return sorted(name for name, p in captioner.named_parameters() if name in state and is_pretrained(p))


def plugin_record(entry):
    """What a checkpoint records of a plugin it needs (its options are in the config)."""
    return json.dumps({"name": entry.name, "package": entry.package, "version": entry.version})


# Checkpoints written before connectors were plugins joined the image by cross-attention.
LEGACY_CONNECTOR = {"name": "cross-attention", "package": "vlcap", "version": ""}


def read_metadata(path):
    path = Path(path)
    if not path.is_file():
        raise VlcapError(f"{path}: checkpoint not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise VlcapError(f"{path}: not a safetensors file ({exc}); pass a checkpoint written by vlcap train") from None
    if metadata.get("format") != FORMAT:
        raise VlcapError(f"{path}: not a vlcap checkpoint (format {metadata.get('format')!r}, expected {FORMAT})")
    try:
        metadata["config"] = json.loads(metadata["config"])
        metadata["peft"] = json.loads(metadata["peft"])
        check_names(metadata["peft"])
        if "connector" in metadata:
            metadata["connector"] = json.loads(metadata["connector"])
            check_names(metadata["connector"])
        else:
            metadata["connector"] = LEGACY_CONNECTOR
        metadata["parameters"] = int(metadata["parameters"])
        for key in ENCODER_FEATURES:
            if key in metadata:  # absent from checkpoints written before they were recorded
                metadata[key] = int(metadata[key])
        if not isinstance(metadata["config"], dict):
            raise ValueError("config is not a mapping")
        if not re.fullmatch(r"[0-9a-f]{16}", metadata.get("decoder_fingerprint", "0" * 16)):
            raise ValueError("decoder_fingerprint is not 16 hex digits")
        if "training" in metadata:  # the history record the weights were saved at (absent before it was kept)
            metadata["training"] = json.loads(metadata["training"])
            if not isinstance(metadata["training"], dict) or not all(
                    isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
                    for k, v in metadata["training"].items()):
                raise ValueError("training is not a mapping of names to numbers")
        if "trained_pretrained" in metadata:  # absent when the method trains no pretrained parameter
            metadata["trained_pretrained"] = json.loads(metadata["trained_pretrained"])
            if not (isinstance(metadata["trained_pretrained"], list)
                    and all(isinstance(n, str) and n in shapes for n in metadata["trained_pretrained"])):
                raise ValueError("trained_pretrained is not a list of the file's tensor names")
        for kind in ("peft", "connector"):
            if not (isinstance(metadata[kind], dict) and all(isinstance(metadata[kind].get(k), str)
                                                             for k in ("name", "package", "version"))):
                raise ValueError(f"{kind} needs name, package and version strings")
    except (KeyError, ValueError, TypeError) as exc:
        raise VlcapError(f"{path}: damaged vlcap metadata ({type(exc).__name__}: {exc})") from None
    except RecursionError:
        raise VlcapError(f"{path}: damaged vlcap metadata (nested too deeply)") from None
    metadata["shapes"] = shapes
    return metadata


def check_names(peft):
    """The PEFT entry's name, package and version are plain names (they are shown in messages and
    looked up in the registry, never imported or put into a command)."""
    if not isinstance(peft, dict):
        return
    for key, pattern in (("name", PLUGIN_NAME), ("package", PACKAGE_NAME), ("version", VERSION)):
        if isinstance(peft.get(key), str) and not pattern.fullmatch(peft[key]):
            raise ValueError(f"plugin {key} {peft[key][:40]!r} is not a valid {key}")


def check_encoder_name(path, cfg):
    """The encoder a checkpoint names must be a plain timm model name; a scheme (``hf-hub:``,
    ``local-dir:``) or a path would let a file choose where weights load from."""
    if not TIMM_NAME.fullmatch(cfg.model.encoder):
        raise VlcapError(f"{path}: names encoder {cfg.model.encoder[:60]!r}, which is not a plain timm model name; "
                         "a checkpoint may not load an encoder from a hub or a folder")


def check_shapes_before_building(path, metadata, cfg, registry):
    """Build the model the metadata describes as shapes only (no memory) and compare its trainable
    tensors with the file's, so a metadata that asks for a huge model is refused before anything
    is allocated."""
    try:
        captioner = build_captioner(cfg, registry, meta=True).captioner
    except VlcapError as exc:
        raise VlcapError(f"{path}: its metadata describes a model that cannot be built ({exc})") from None
    differences = shape_differences(metadata["shapes"], captioner)
    if differences:
        raise VlcapError(f"{path}: does not match the model its metadata describes ({differences[0]})")


def check_decoding(path, cfg, registry):
    """The decoding defaults a checkpoint carries are valid options of an installed strategy (a
    strategy that is not installed here is named when captioning asks for it)."""
    if cfg.decoding.strategy in registry.names("decoding"):
        plugin_config(registry.get("decoding", cfg.decoding.strategy), cfg.decoding.options,
                      f"{path} metadata: decoding.options")


def load_checkpoint(path, registry, decoder_weights=None, device="cpu", merge=False):
    """Rebuild the captioner a checkpoint describes and fill in its trainable parameters. Every
    check on the file's metadata runs before the model is built; every tensor is checked against
    the built model before any is read. ``merge``: fold the PEFT method into the frozen weights
    (``merge_peft``; one line if it cannot merge, checked before anything loads)."""
    path = Path(path)
    metadata = read_metadata(path)
    cfg = config_lib.from_dict(RunConfig, metadata["config"], where=f"{path} metadata")
    check_plugins(path, metadata, cfg, registry)
    check_encoder_name(path, cfg)
    check_decoding(path, cfg, registry)
    if merge:  # a method that cannot merge is one line before anything loads
        check_mergeable(registry.get("peft", cfg.peft.method))
    weights = decoder_weights or cfg.model.decoder_weights
    if weights is None:
        raise VlcapError(f"{path}: no decoder weights recorded; pass --decoder-weights PATH/decoder_model.bin")
    tokenizer = tokenizer_for(cfg)
    check_tokenizer(path, metadata, tokenizer)
    check_parameter_count(path, metadata)
    check_shapes_before_building(path, metadata, cfg, registry)
    captioner, method, _ = build_captioner(cfg, registry, decoder_weights=weights)
    check_encoder_features(path, metadata, captioner.encoder)
    check_decoder_fingerprint(path, metadata, captioner.decoder, weights)
    fill_trainable(path, metadata["shapes"], captioner)
    captioner.to(device).eval()
    if merge:
        merge_peft(captioner, method)
    return LoadedCaptioner(captioner, tokenizer, cfg, method, metadata)


def check_tokenizer(path, metadata, tokenizer):
    if tokenizer.fingerprint != metadata.get("tokenizer"):
        raise VlcapError(f"{path}: trained with tokenizer {metadata.get('tokenizer')}, but the files at "
                         f"{tokenizer.encoder_json} give {tokenizer.fingerprint}; use the same encoder.json/vocab.bpe")


def check_plugins(path, metadata, cfg, registry):
    """The checkpoint's PEFT method and connector, each as ``check_plugin`` checks it."""
    check_plugin(path, "peft", metadata["peft"], cfg.peft.method, registry)
    check_plugin(path, "connector", metadata["connector"], cfg.connector.name, registry)


def check_plugin(path, kind, recorded, configured, registry):
    """A plugin a checkpoint needs (``recorded``: name, package, version) is looked up in the
    registry by name, never imported from what the file says; a missing one names its package,
    another version of it is a warning (a checkpoint older than the record is not warned about)."""
    label = KINDS[kind][1]
    if recorded["name"] != configured:
        raise VlcapError(f"{path}: metadata names {label} '{recorded['name']}' but its config says "
                         f"'{configured}'; the file was altered")
    if recorded["name"] not in registry.names(kind):
        version = f" (version {recorded['version']})" if recorded["version"] else ""
        raise VlcapError(f"{path}: needs {label} '{recorded['name']}' from package '{recorded['package']}'{version}, "
                         "which is not installed; install that package if you trust the checkpoint's source "
                         "(vlcap list-plugins shows what is installed)")
    installed = registry.entry(kind, recorded["name"])
    if recorded["version"] and (installed.package, installed.version) != (recorded["package"], recorded["version"]):
        warnings.warn(f"{path}: made with {label} '{recorded['name']}' from {recorded['package']} "
                      f"{recorded['version']}, loading it with {installed.package} {installed.version}; if its "
                      "outputs differ, install the version it was made with", VlcapWarning, stacklevel=4)


def check_parameter_count(path, metadata):
    """The tensors' sizes add up to the count the metadata states, which is within the budget."""
    held = sum(math.prod(s) for s in metadata["shapes"].values())
    if held != metadata["parameters"]:
        raise VlcapError(f"{path}: holds {held:,} parameters but its metadata "
                         f"says {metadata['parameters']:,}; the file was altered")
    check_budget(metadata["parameters"], what=str(path))


def trainable_parameters(captioner):
    return {name: p for name, p in captioner.named_parameters() if p.requires_grad}


def shape_differences(shapes, captioner):
    """What keeps tensors of these ``shapes`` (name -> shape) from filling exactly ``captioner``'s
    trainable parameters, as phrases for an error line; empty when names and shapes all match."""
    expected = trainable_parameters(captioner)
    unused, missing = sorted(set(shapes) - set(expected)), sorted(set(expected) - set(shapes))
    differences = []
    if unused or missing:
        differences.append(f"unused keys: {few(unused)}; trainable parameters without a value: {few(missing)}")
    differences += [f"{name} has shape {shape}, the model needs {tuple(expected[name].shape)}"
                    for name, shape in shapes.items() if name in expected and shape != tuple(expected[name].shape)]
    return differences


def fill_trainable(path, shapes, captioner):
    """Copy the file's tensors into ``captioner``'s trainable parameters: exactly those names,
    exactly those shapes, or one line saying what differs."""
    differences = shape_differences(shapes, captioner)
    if differences:
        raise VlcapError(f"{path}: does not match the model its metadata describes ({differences[0]})")
    copy_trainable(path, shapes, captioner)


def copy_trainable(path, shapes, captioner):
    """Read the tensors named in ``shapes`` (already checked against the model) into ``captioner``."""
    expected = trainable_parameters(captioner)
    with safe_open(str(path), framework="pt") as f, torch.no_grad():
        for name in shapes:
            expected[name].copy_(f.get_tensor(name))


def check_decoder_fingerprint(path, metadata, decoder, weights):
    """Warn, loudly, when the decoder weights loaded are not the ones the checkpoint was trained
    on (checkpoints written before the fingerprint was recorded are not checked)."""
    recorded, loaded = metadata.get("decoder_fingerprint"), decoder_fingerprint(decoder)
    if recorded is not None and recorded != loaded:
        warnings.warn(f"{path}: trained on top of decoder weights {recorded}, but {weights} gives {loaded}: "
                      "captions from another decoder are noise; pass the decoder_model.bin it was trained with "
                      "(--decoder-weights)", VlcapWarning, stacklevel=3)


def init_trainable(path, captioner, cfg, tokenizer, registry):
    """``vlcap train --init-from``: start a new run from a checkpoint's trainable weights. The
    run's ``captioner`` is built from its own resolved config ``cfg`` as usual; the checkpoint
    must come from the same PEFT method, encoder features and tokenizer, and hold exactly the
    run's trainable names and shapes, else one line naming the first differences. Only weights
    are taken: the new run's optimizer, schedule and counters start fresh."""
    metadata = read_metadata(path)
    saved_cfg = config_lib.from_dict(RunConfig, metadata["config"], where=f"{path} metadata")
    check_plugins(path, metadata, saved_cfg, registry)
    if saved_cfg.connector.name != cfg.connector.name:
        raise VlcapError(f"{path}: trained with connector '{saved_cfg.connector.name}', but this run uses "
                         f"'{cfg.connector.name}'; pass --connector {saved_cfg.connector.name} to start from it")
    if saved_cfg.peft.method != cfg.peft.method:
        raise VlcapError(f"{path}: trained with PEFT method '{saved_cfg.peft.method}', but this run uses "
                         f"'{cfg.peft.method}'; pass --peft {saved_cfg.peft.method} to start from it")
    check_tokenizer(path, metadata, tokenizer)
    check_parameter_count(path, metadata)
    check_encoder_features(path, metadata, captioner.encoder)
    check_decoder_fingerprint(path, metadata, captioner.decoder, cfg.model.decoder_weights)
    differences = shape_differences(metadata["shapes"], captioner)
    if differences:
        raise VlcapError(form_mismatch(path, metadata["shapes"], saved_cfg, cfg, differences, registry))
    copy_trainable(path, metadata["shapes"], captioner)


def form_mismatch(path, shapes, saved_cfg, cfg, differences, registry):
    """The one-line error for a checkpoint whose tensors do not fit the run: the PEFT options that
    differ (the checkpoint records those of the form it saved, which may not be the form its run
    trained, see ``PeftMethod.export``), the first differing tensors and, when a shapes-only
    build shows that taking the checkpoint's values for them makes the tensors fit, the --set
    flags that do so."""
    method, saved, ours = cfg.peft.method, saved_cfg.peft.options, cfg.peft.options
    differing = sorted(k for k in set(saved) | set(ours) if saved.get(k) != ours.get(k))
    if not differing:
        return f"{path}: its trainable tensors do not match this run's {method} model: {'; '.join(differences[:2])}"
    line = (f"{path}: PEFT method {method} ({options_text(saved, differing)}) does not match this run's "
            f"{method} ({options_text(ours, differing)}): {'; '.join(differences[:2])}")
    fix = {k: saved[k] for k in differing if k in saved}
    if fix and fits_with_options(shapes, cfg, fix, registry):
        line += "; to start from it: " + " ".join(f"--set peft.options.{k}={yaml_text(v)}" for k, v in fix.items())
    return line


def options_text(options, keys):
    return ", ".join(f"{k}={options.get(k)}" for k in keys)


def yaml_text(value):
    """``value`` as --set parses it back (``false``, ``8``, ``[1, 2]``, ``name``)."""
    return value if isinstance(value, str) else json.dumps(value)


def fits_with_options(shapes, cfg, options, registry):
    """Whether ``cfg``'s model built (shapes only) with these PEFT ``options`` has exactly the
    trainable ``shapes`` (name -> shape) of the checkpoint."""
    trial = dataclasses.replace(cfg, peft=dataclasses.replace(cfg.peft, options={**cfg.peft.options, **options}))
    try:
        captioner = build_captioner(trial, registry, meta=True).captioner
    except VlcapError:
        return False
    return not shape_differences(shapes, captioner)


def check_encoder_features(path, metadata, encoder):
    """The encoder built here must give the feature tokens the checkpoint was trained on (another
    timm version or image size can change them under the same name). Checkpoints written before
    these were recorded are not checked."""
    built = {"encoder_width": encoder.embed_dim, "encoder_tokens": encoder.num_tokens}
    if any(metadata.get(key, value) != value for key, value in built.items()):
        raise VlcapError(f"{path}: trained on {metadata.get('encoder_width', '?')}-wide x "
                         f"{metadata.get('encoder_tokens', '?')} feature tokens of encoder '{encoder.name}', but it "
                         f"gives {encoder.embed_dim}-wide x {encoder.num_tokens} here; use the timm version and "
                         "encoder it was trained with")
