"""Config values and plugin options are checked where they enter: one line naming the key, the value
and what is allowed, from the dataclasses' own annotations (so new sections need no change)."""
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Annotated, Optional

import pytest
from click.testing import CliRunner
from hypothesis import given, settings, strategies as st

from vlcap.cli import main
from vlcap.core import config as config_lib
from vlcap.core.errors import VlcapError
from vlcap.core.validation import Ge, Interval, build


@pytest.mark.parametrize("assignment, message", [
    ("train.lr=abc", r"^train.lr = 'abc': expected a finite number > 0$"),
    ("train.lr=0", "train.lr = 0: expected a finite number > 0"),
    ("train.lr=.nan", "train.lr = nan: expected a finite number > 0"),
    ("train.lr=.inf", "train.lr = inf"),
    ("train.batch_size=0", "train.batch_size = 0: expected an integer >= 1"),
    ("train.batch_size=true", "train.batch_size = True: expected an integer >= 1"),
    ("train.batch_size=2.5", "train.batch_size = 2.5"),
    ("train.grad_accum=0", "train.grad_accum = 0"),
    ("train.save_every=0", "train.save_every = 0"),
    ("train.num_workers=-1", "train.num_workers = -1: expected an integer >= 0"),
    ("train.epochs=0", "train.epochs = 0"),
    ("train.max_steps=0", "train.max_steps = 0: expected an integer >= 1 or null"),
    ("train.clip_grad=0", "train.clip_grad = 0: expected a finite number > 0"),
    ("train.clip_grad=-1", "train.clip_grad = -1"),
    ("train.min_lr_ratio=2", "train.min_lr_ratio = 2: expected a finite number >= 0 and <= 1"),
    ("train.device=gpu", "train.device = 'gpu': expected auto, cpu, cuda or cuda:N"),
    ("train.amp=fp8", "train.amp = 'fp8': expected one of 'auto', 'off', 'bf16', 'fp16'"),
    ("train.metrics=[1]", "train.metrics = \\[1\\]: expected a list of text"),
    ("train.seed=99999999999999999999999", "train.seed = 99999999999999999999999: integers must lie within"),
    ("model.decoder.n_head=5", "model.decoder: n_embd = 64 is not a multiple of n_head = 5"),
    ("model.decoder.n_embd=100000", "model.decoder.n_embd = 100000: expected an integer >= 1 and <= 16384"),
    ("data.max_caption_tokens=500", "data.max_caption_tokens = 500 does not fit the decoder's context .* at most 254"),
    ("decoding.max_length=257", "decoding.max_length = 257 is beyond the decoder's context .* at most 256"),
    ("data.feature_cache_dtype=int8", "data.feature_cache_dtype = 'int8'"),
    ("train.bogus=1", "unknown key train.bogus; known: epochs"),
    ("train.bach_size=1", "unknown key train.bach_size; did you mean batch_size\\?"),
    ("train=5", "train = 5: expected a mapping with keys epochs"),
    ("model.decoder=null", "model.decoder = None: expected a mapping"),
    ("train.lr=!!python/name:os.system", "--set 'train.lr=!!python/name:os.system': the value is not a YAML scalar"),
    ("train.lr=[1", "the value is not a YAML scalar or list"),
    ("train.lr.x=1", "train.lr = {'x': 1}: expected a finite number"),
    ("train..lr=1", "not a config key"),
])
def test_bad_set_values_are_one_line_naming_key_value_and_range(assignment, message):
    with pytest.raises(VlcapError, match=message) as error:
        config_lib.resolve("tiny", overrides=[config_lib.parse_set([assignment])])
    assert "\n" not in str(error.value)


def test_good_values_still_resolve():
    cfg = config_lib.resolve("tiny", overrides=[config_lib.parse_set(
        ["train.lr=1e-4", "train.device=cuda:1", "train.compile=inductor", "train.max_steps=7", "train.lr=3"])])
    assert (cfg.train.lr, cfg.train.device, cfg.train.compile, cfg.train.max_steps) == (3.0, "cuda:1", "inductor", 7)
    assert isinstance(cfg.train.lr, float)


@pytest.mark.parametrize("text, message", [
    ("train:\n  lr: !!str 1e-4\n", "run.yaml: train.lr = '1e-4': expected a finite number > 0"),
    ("train:\n  epochs: !!float 3\n", "run.yaml: train.epochs = 3.0: expected an integer >= 1"),
    ("train:\n  lr: !!binary aGk=\n", "run.yaml: train.lr = b'hi'"),
    ("model:\n  encoder: !!python/object/apply:os.system [ls]\n", "run.yaml: not valid YAML"),
    ("train: " + "[" * 5000 + "]" * 5000 + "\n", "run.yaml: (nested too deeply|not valid YAML)"),
])
def test_config_files_are_validated_alike(tmp_path, text, message):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(VlcapError, match=message):
        config_lib.resolve("tiny", path)


def test_the_cli_gives_one_line_not_a_traceback(tmp_path):
    result = CliRunner().invoke(main, ["train", "--preset", "tiny", "--dry-run", "--set", "peft.options.r=abc"])
    assert result.exit_code == 1 and result.exception is None or isinstance(result.exception, SystemExit)
    assert result.output.strip() == ("Error: peft.options.r = 'abc': expected an integer >= 1 and <= 16384 "
                                     "(the options of 'lora': vlcap list-plugins --options)")
    result = CliRunner().invoke(main, ["train", "--preset", "tiny", "--dry-run", "--batch-size", "0"])
    assert result.output.strip() == "Error: train.batch_size = 0: expected an integer >= 1"


@pytest.mark.parametrize("kind, name, options, message", [
    ("peft", "lora", {"r": "abc"}, "peft.options.r = 'abc': expected an integer >= 1"),
    ("peft", "lora", {"r": 0}, "peft.options.r = 0"),
    ("peft", "lora", {"dropout": 1.5}, "peft.options.dropout = 1.5: expected a finite number >= 0 and < 1"),
    ("peft", "lora", {"targets": "q"}, "peft.options.targets = 'q': expected a list of text"),
    ("peft", "adapter", {"placement": "middle"}, "peft.options.placement = 'middle': expected one of 'houlsby'"),
    ("peft", "adapter", {"activation": "tanh"}, "peft.options.activation = 'tanh'"),
    ("peft", "prefix", {"length": -3}, "peft.options.length = -3"),
    ("peft", "prefix", {"reparam": "yes"}, "peft.options.reparam = 'yes': expected true or false"),
    ("decoding", "beam", {"num_beams": 0}, "decoding.options.num_beams = 0: expected an integer >= 1 and <= 256"),
    ("decoding", "beam", {"num_beams": 10 ** 6}, "decoding.options.num_beams = 1000000"),
    ("decoding", "beam", {"max_length": 10 ** 9}, "decoding.options.max_length = 1000000000"),
    ("decoding", "top_k", {"k": 0}, "decoding.options.k = 0"),
    ("decoding", "top_p", {"p": 0}, "decoding.options.p = 0: expected a finite number > 0 and <= 1"),
    ("decoding", "top_p", {"temperature": -1}, "decoding.options.temperature = -1"),
    ("decoding", "greedy", {"x": 1}, "'greedy' takes no options"),
])
def test_plugin_options_of_every_kind_are_validated(registry, kind, name, options, message):
    with pytest.raises(VlcapError, match=message):
        config_lib.plugin_config(registry.get(kind, name), options, f"{kind}.options")


@dataclass(frozen=True)
class ConnectorLike:
    """A section someone else adds: validated from its annotations alone."""
    name: str = "linear"
    options: dict = field(default_factory=dict)
    depth: Annotated[int, Ge(1)] = 1


@dataclass(frozen=True)
class RunLike:
    connector: ConnectorLike = field(default_factory=ConnectorLike)
    scale: Optional[Annotated[float, Interval(gt=0, le=1)]] = None


def test_a_new_section_is_validated_with_no_change():
    assert build(RunLike, {"connector": {"name": "mlp", "depth": 2}}).connector == ConnectorLike("mlp", {}, 2)
    with pytest.raises(VlcapError, match=r"^run.yaml: connector.name = 3: expected text$"):
        build(RunLike, {"connector": {"name": 3}}, "run.yaml")
    with pytest.raises(VlcapError, match="connector.depth = 0: expected an integer >= 1"):
        build(RunLike, {"connector": {"depth": 0}})
    with pytest.raises(VlcapError, match="connector.options = 'x': expected a mapping"):
        build(RunLike, {"connector": {"options": "x"}})
    with pytest.raises(VlcapError, match="scale = 2: expected a finite number > 0 and <= 1 or null"):
        build(RunLike, {"scale": 2})


def test_a_plugin_option_without_a_default_is_required():
    @dataclass
    class Needs:
        size: int

    with pytest.raises(VlcapError, match="missing required key opts.size \\(an integer\\)"):
        from vlcap.core.validation import build_at
        build_at(Needs, {}, "opts")


# --- fuzz -----------------------------------------------------------------------------------------

LEAVES = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2 ** 70, max_value=2 ** 70),
                   st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8), st.binary(max_size=4))
VALUES = st.recursive(LEAVES, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                      st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                      max_leaves=8)
KEYS = st.sampled_from([f"{section}.{f.name}" for section in ("model", "data", "train", "decoding", "peft")
                        for f in dataclasses.fields(type(getattr(config_lib.RunConfig(), section)))]
                       + ["model.decoder.n_head", "model.decoder.block_size", "train", "bogus.key", "peft.options.r"])


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(KEYS, VALUES, min_size=1, max_size=4))
def test_fuzz_any_override_gives_a_valid_config_or_one_line(assignments):
    overrides = {}
    for key, value in assignments.items():
        try:
            config_lib.set_key(overrides, key, value)
        except VlcapError:
            return
    try:
        cfg = config_lib.resolve("tiny", overrides=[overrides])
    except VlcapError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    # what got through is what the fields promise
    assert isinstance(cfg.train.batch_size, int) and cfg.train.batch_size >= 1
    assert isinstance(cfg.train.lr, float) and math.isfinite(cfg.train.lr) and cfg.train.lr > 0
    assert cfg.model.decoder.n_embd % cfg.model.decoder.n_head == 0
    assert cfg.data.max_caption_tokens + 2 <= cfg.model.decoder.block_size
    assert config_lib.from_dict(config_lib.RunConfig, config_lib.to_dict(cfg)) == cfg  # a checkpoint reloads it


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["r", "alpha", "dropout", "targets", "layers", "x"]), VALUES, max_size=3))
def test_fuzz_plugin_options_give_a_config_or_one_line(registry, options):
    try:
        config = config_lib.plugin_config(registry.get("peft", "lora"), options, "peft.options")
    except VlcapError as exc:
        assert "\n" not in str(exc)
        return
    assert isinstance(config.r, int) and config.r >= 1 and 0 <= config.dropout < 1


class Opaque:
    pass


@dataclass
class OddOptions:
    """A plugin's options with types pydantic cannot check: left to the plugin, never a traceback."""
    thing: Opaque = None
    later: "NotDefinedAnywhere" = 1  # noqa: F821


def test_option_types_the_validator_cannot_check_are_passed_through():
    assert build(OddOptions, {"thing": 5, "later": "x"}) == OddOptions(5, "x")
