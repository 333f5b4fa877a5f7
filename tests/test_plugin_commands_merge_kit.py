"""Plugin commands (``register_commands``), merged inference (``caption --merge``) and the kit's
options (``--vlcap-plugin-option``, the ``vlcap_packages`` ini setting)."""
import json

import pytest
from PIL import Image

from conftest import install_package, vlcap_cli

from vlcap.core import plugins as plugins_lib
from vlcap.core.errors import VlcapError

COMMANDS = '''
import click

import vlcap


@vlcap.hookimpl
def register_commands(cli):
    @cli.command()
    @click.option("--name", default="world")
    def hello(name):
        """Say hello (a plugin command)."""
        click.echo(f"hello {name}")

    @cli.command()
    def train():
        """A command named like vlcap's own: skipped."""
        click.echo("plugin train")
'''


@pytest.fixture
def fresh_registry():
    plugins_lib.registry.cache_clear()
    yield
    plugins_lib.registry.cache_clear()


def test_hook_register_commands(site, fresh_registry):
    install_package(site, "vlcap-hello", "vlcap_hello", COMMANDS)
    result = vlcap_cli("hello", "--name", "vlcap")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "hello vlcap"
    listed = {e["name"]: e for e in json.loads(vlcap_cli("list-plugins", "--json").stdout)}
    assert listed["hello"]["kind"] == "command" and listed["hello"]["package"] == "vlcap-hello"
    assert listed["hello"]["description"] == "Say hello (a plugin command)."
    hooks = {m["entry_point"]: m for m in json.loads(vlcap_cli("list-plugins", "--hooks", "--json").stdout)}
    assert hooks["vlcap_hello"]["hooks"] == ["register_commands"]
    overview = vlcap_cli("--help")
    assert "hello" in overview.stdout and "Say hello" in overview.stdout
    assert "command 'train' of package 'vlcap-hello' has the name of a vlcap command; skipped it" in overview.stderr
    shadowed = vlcap_cli("train", "--help")
    assert shadowed.exit_code == 0 and "plugin train" not in shadowed.output and "--peft" in shadowed.output


# --- merged inference -------------------------------------------------------------------------

def saved_checkpoint(tmp_path, method, registry):
    """A tiny checkpoint of ``method`` with trained-looking (perturbed) weights, no training."""
    from vlcap.api import perturb_trainable, tiny_config
    from vlcap.core.model.checkpoint import save_checkpoint
    from vlcap.core.train.trainer import prepare_model
    tokenizer, captioner, method_plugin, cfg = prepare_model(tiny_config(method), registry, tmp_path)
    perturb_trainable(captioner, std=0.1)
    path = tmp_path / f"{method}.safetensors"
    save_checkpoint(path, captioner, method_plugin, cfg, tokenizer, registry)
    return path


def test_caption_merge_gives_the_same_captions_and_merges(tmp_path, registry, synthetic):
    from vlcap.core.model.checkpoint import load_checkpoint
    images = tmp_path / "images"
    images.mkdir()
    for source in sorted((synthetic / "images_val").iterdir())[:3]:
        Image.open(source).save(images / source.name)
    checkpoint = saved_checkpoint(tmp_path, "lora", registry)
    outputs = {}
    for flags in ((), ("--merge",)):
        out = tmp_path / f"pred{len(flags)}.json"
        result = vlcap_cli("caption", images, "--checkpoint", checkpoint, "--out", out, "--max-length", 8, *flags)
        assert result.exit_code == 0, result.output
        outputs[flags] = json.loads(out.read_text())
    assert outputs[()] == outputs[("--merge",)] and len(outputs[()]) == 3
    merged = load_checkpoint(checkpoint, registry, merge=True).captioner
    assert merged.merged and all(m.merged for m in merged.modules() if hasattr(m, "lora_A"))
    with pytest.raises(VlcapError, match="merged into its base weights"):
        from vlcap.core.model.checkpoint import save_checkpoint
        save_checkpoint(tmp_path / "again.safetensors", merged, None, None, None, registry)


def test_merge_of_a_method_that_cannot_is_one_line(tmp_path, registry):
    checkpoint = saved_checkpoint(tmp_path, "adapter", registry)
    (tmp_path / "images").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "images/a.png")
    result = vlcap_cli("caption", tmp_path / "images", "--checkpoint", checkpoint, "--out", tmp_path / "p.json",
                       "--merge")
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert not (tmp_path / "p.json").exists()
    assert lines == ["Error: PEFT method 'adapter' cannot be merged into the base weights; caption without --merge "
                     "(the captions are the same, only slower)"]


# --- the kit's options and package selection --------------------------------------------------

def test_kit_checks_run_with_the_options_given():
    from vlcap.api import check_peft_method
    with pytest.raises(VlcapError, match="over the 35,000,000 budget"):
        check_peft_method("lora", "budget", options={"r": 4096, "targets": ["q", "v", "mlp"]})
    with pytest.raises(VlcapError, match="unknown key"):
        check_peft_method("lora", "budget", options={"rank": 4})


KIT_TESTS = """
from vlcap.api import check_decoding_strategy, check_peft_method

def test_peft(vlcap_peft_method, vlcap_peft_check):
    check_peft_method(vlcap_peft_method, vlcap_peft_check)

def test_decoding(vlcap_decoding_strategy, vlcap_decoding_check):
    check_decoding_strategy(vlcap_decoding_strategy, vlcap_decoding_check)
"""


def test_pytest_plugin_option_reaches_the_checks(pytester):
    pytester.makepyfile(test_kit=KIT_TESTS)
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "--vlcap-plugin", "lora", "-k", "budget",
                                          "--vlcap-plugin-option", "r=4096",
                                          "--vlcap-plugin-option", "lora.targets=[q, v, mlp]")
    result.assert_outcomes(failed=1)
    assert "over the 35,000,000 budget" in result.stdout.str()
    bad = pytester.runpytest_inprocess("-p", "no:cacheprovider", "--vlcap-plugin", "lora",
                                       "--vlcap-plugin-option", "adapter.r=2")
    assert bad.ret == pytest.ExitCode.USAGE_ERROR and "'adapter' is not a selected plugin" in bad.stderr.str()
    from vlcap.testing.kit import CONFIGURED_OPTIONS
    assert "lora" not in CONFIGURED_OPTIONS  # the options ended with the session that set them


def test_vlcap_packages_ini_makes_a_bare_pytest_check_only_the_packages_plugins(pytester, site):
    install_package(site, "vlcap-toy", "vlcap_toy", '''
import vlcap
from vlcap.api import PeftMethod

class Toy(PeftMethod):
    name = "toy"
    def apply(self, captioner, config):
        pass

@vlcap.hookimpl
def register_peft_methods(register):
    register(Toy())
''')
    plugins_lib.registry.cache_clear()
    try:
        pytester.makepyprojecttoml('[tool.pytest.ini_options]\nvlcap_packages = ["vlcap-toy"]\n')
        pytester.makepyfile(test_kit=KIT_TESTS)
        result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "--collect-only", "-q")
    finally:
        plugins_lib.registry.cache_clear()
    lines = result.stdout.lines
    peft = [line for line in lines if "::test_peft[" in line]
    assert len(peft) == 8 and all("[toy-" in line for line in peft), result.stdout.str()
    decoding = [line for line in lines if "::test_decoding[" in line]
    assert decoding and all("[NOTSET-" in line for line in decoding)  # the package has no strategy: none run
    assert "lora" not in result.stdout.str()
