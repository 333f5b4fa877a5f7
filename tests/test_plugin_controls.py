"""Plugin controls: which packages load, broken plugins skipped (or fatal with --strict-plugins),
hook listing and tracing, checkpoint plugin provenance; and the datasette-style meta-tests."""
import ast
import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import install_package, tiny_config, vlcap_cli
from test_plugins import PEFT_PLUGIN, install_peft_package
from vlcap import cli as cli_module
from vlcap.cli import main
from vlcap.core import hookspecs, plugins
from vlcap.core.model.checkpoint import load_checkpoint, save_checkpoint
from vlcap.core.errors import VlcapError, VlcapWarning
from vlcap.core.plugins import load_registry
from vlcap.core.train.trainer import prepare_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def fresh_registry():
    """The CLI caches the registry per process; these tests change what is installed."""
    plugins.registry.cache_clear()
    yield
    plugins.registry.cache_clear()


def cli(*args, **env):
    return vlcap_cli(*args, env=env)


BROKEN_AT_IMPORT = "raise ImportError('needs torch 9')\n"
BROKEN_AT_REGISTRATION = PEFT_PLUGIN.replace("    register(Method())", "    register(Method())\n    raise RuntimeError('oops')")


def test_a_plugin_that_raises_at_import_is_skipped_and_named(site, fresh_registry):
    install_package(site, "vlcap-broken", "vlcap_broken", BROKEN_AT_IMPORT)
    result = cli("list-plugins")
    assert result.exit_code == 0, result.output
    warning = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "'vlcap-broken' 0.3 failed to load: ImportError: needs torch 9" in warning[0]
    assert "vlcap-broken" in result.output.split("vlcap plugins")[1]  # the table names it too
    assert "lora" in result.output
    listed = json.loads(CliRunner().invoke(main, ["list-plugins", "--json"]).stdout)  # warning on stderr only
    assert "lora" in {e["name"] for e in listed}


def test_strict_plugins_turns_a_broken_plugin_into_an_error(site, fresh_registry):
    install_package(site, "vlcap-broken", "vlcap_broken", BROKEN_AT_IMPORT)
    for args, env in ((["--strict-plugins", "list-plugins"], {}), (["list-plugins"], {"VLCAP_STRICT_PLUGINS": "1"})):
        plugins.registry.cache_clear()
        result = cli(*args, **env)
        assert result.exit_code == 1
        assert re.search(r"Error: plugin 'vlcap_broken' of package 'vlcap-broken' 0.3 failed to load: ImportError", result.output)


def test_a_plugin_that_raises_while_registering_is_dropped_whole(site):
    install_package(site, "vlcap-half", "vlcap_half", BROKEN_AT_REGISTRATION.format(name="half"))
    with pytest.warns(VlcapWarning, match="'vlcap-half' 0.3 failed to register: RuntimeError: oops"):
        registry = load_registry()
    assert "half" not in registry.names("peft")  # what it registered before raising is not kept
    assert [m.package for m in registry.failed()] == ["vlcap-half"]
    with pytest.raises(VlcapError, match="failed to register"):
        load_registry(strict=True)


def test_load_plugins_env_chooses_packages(site, monkeypatch):
    install_peft_package(site, "vlcap-one", "one")
    install_peft_package(site, "vlcap-two", "two")
    monkeypatch.setenv("VLCAP_LOAD_PLUGINS", "vlcap_one")  # pip's name normalisation applies
    assert set(load_registry().names("peft")) == {"lora", "adapter", "prefix", "none", "one"}
    monkeypatch.setenv("VLCAP_LOAD_PLUGINS", "")
    assert set(load_registry().names("peft")) == {"lora", "adapter", "prefix", "none"}  # built-ins always load
    monkeypatch.setenv("VLCAP_LOAD_PLUGINS", "vlcap-two,vlcap-nope")
    with pytest.warns(VlcapWarning, match="VLCAP_LOAD_PLUGINS names vlcap-nope"):
        assert "two" in load_registry().names("peft")


def test_load_plugins_env_resolves_an_entry_point_clash(site, monkeypatch):
    install_peft_package(site, "vlcap-other", "other-lora", entry_point="lora")
    with pytest.raises(VlcapError, match="entry point 'lora' is declared by"):
        load_registry()
    monkeypatch.setenv("VLCAP_LOAD_PLUGINS", "")
    assert "other-lora" not in load_registry().names("peft")


def test_list_plugins_hooks_shows_what_each_package_implements(site, fresh_registry, monkeypatch):
    monkeypatch.setattr(cli_module.console, "width", 200)
    install_peft_package(site, "vlcap-toy", "toy")
    install_package(site, "vlcap-broken", "vlcap_broken", BROKEN_AT_IMPORT)
    modules = {m["entry_point"]: m for m in json.loads(CliRunner().invoke(main, ["list-plugins", "--hooks", "--json"]).stdout)}
    assert modules["decoding"]["hooks"] == ["register_decoding_strategies"]
    assert modules["vlcap_toy_plugin"]["package"] == "vlcap-toy"
    assert modules["vlcap_toy_plugin"]["hooks"] == ["register_peft_methods"]
    assert modules["vlcap_broken"]["error"].startswith("ImportError")
    table = cli("list-plugins", "--hooks").output
    assert "register_metrics" in table and "vlcap-toy" in table and "failed: ImportError" in table


def test_trace_plugins_logs_every_hook_call(fresh_registry):
    result = subprocess.run(["vlcap", "--trace-plugins", "list-plugins", "--json"], capture_output=True, text=True, check=True)
    assert "vlcap plugins: calling register_peft_methods on lora (vlcap " in result.stderr
    assert "vlcap plugins: register_metrics returned" in result.stderr
    json.loads(result.stdout)  # the trace stays off stdout


@pytest.fixture
def lora_checkpoint(registry, tmp_path):
    cfg = tiny_config("lora")
    tokenizer, captioner, method, cfg = prepare_model(cfg, registry, tmp_path)
    path = tmp_path / "lora.safetensors"
    save_checkpoint(path, captioner, method, cfg, tokenizer, registry)
    return path


def test_checkpoint_from_another_plugin_version_warns(lora_checkpoint, registry, monkeypatch):
    entry = registry.entry("peft", "lora")
    other = plugins.Registry([e if e is not entry else plugins.PluginEntry(
        e.name, e.kind, e.package, "9.9", e.description, e.obj) for e in registry.entries()])
    with pytest.warns(VlcapWarning, match=r"from vlcap \S+, loading it with vlcap 9.9; if its outputs differ, install the version it was made with"):
        load_checkpoint(lora_checkpoint, other)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_checkpoint(lora_checkpoint, registry)  # same version: silent


# --- meta-tests: every hook is documented and tested ------------------------------------

HOOKS = [name for name, fn in vars(hookspecs).items() if callable(fn) and hasattr(fn, "vlcap_spec")]


def test_hookspecs_are_found():
    assert set(HOOKS) >= {"register_peft_methods", "register_decoding_strategies", "register_metrics"}


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_is_documented(hook):
    docs = (ROOT / "docs/plugins.md").read_text()
    assert re.search(rf"^### `{hook}\(\w+\)`", docs, re.M), f"docs/plugins.md has no section for {hook}"


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_has_a_test(hook):
    # Each hook is exercised through a real (fake-installed) package by a test named after it.
    tests = {node.name for path in (ROOT / "tests").glob("test_*.py")
             for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.FunctionDef)}
    assert f"test_hook_{hook}" in tests


def test_pytest_option_runs_the_kit_for_the_named_plugin_only():
    def pytest_run(*args):
        return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rA",
                               str(ROOT / "tests/test_conformance.py"), *args], capture_output=True, text=True, cwd=ROOT)
    result = pytest_run("--vlcap-plugin", "lora", "-k", "budget")
    assert result.returncode == 0, result.stdout
    assert "PASSED tests/test_conformance.py::test_peft_method_conforms[lora-budget]" in result.stdout
    assert "adapter" not in result.stdout and "prefix" not in result.stdout
    result = pytest_run("--vlcap-plugin", "nope")
    assert result.returncode == 4  # pytest's usage error
    assert "--vlcap-plugin nope: not an installed PEFT method, decoding strategy, metric or connector" \
        in result.stderr
