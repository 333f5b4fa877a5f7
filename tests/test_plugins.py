"""Plugin discovery: built-ins and third-party packages come through the same entry points."""
import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from conftest import install_package

from vlcap.cli import main
from vlcap.core.errors import VlcapError
from vlcap.core.plugins import load_registry


def test_list_plugins_json_lists_builtins_from_entry_points():
    # A subprocess runs the installed console script: this is what a user's shell sees.
    out = subprocess.run(["vlcap", "list-plugins", "--json"], capture_output=True, text=True, check=True).stdout
    entries = {(e["name"], e["kind"]): e for e in json.loads(out)}
    for name in ("lora", "adapter", "prefix"):
        assert entries[(name, "peft")]["package"] == "vlcap"
        assert entries[(name, "peft")]["version"]
    assert ("greedy", "decoding") in entries


def test_list_plugins_table_names_every_method():
    result = CliRunner().invoke(main, ["list-plugins"], terminal_width=200)
    assert result.exit_code == 0
    for word in ("lora", "adapter", "prefix", "greedy", "package", "version"):
        assert word in result.output


PEFT_PLUGIN = """
import vlcap
from vlcap.core.model.peft import PeftMethod

class Method(PeftMethod):
    name = {name!r}
    description = "third-party test method"

    def apply(self, captioner, config):
        pass

@vlcap.hookimpl
def register_peft_methods(register):
    register(Method())
"""


def install_peft_package(root, dist_name, method_name, entry_point=None):
    module = f"{dist_name.replace('-', '_')}_plugin"
    install_package(root, dist_name, module, PEFT_PLUGIN.format(name=method_name), entry_point=entry_point)


def test_hook_register_peft_methods(site):
    install_peft_package(site, "vlcap-toy", "toy")
    registry = load_registry()
    entry = registry.entry("peft", "toy")
    assert (entry.package, entry.version, entry.description) == ("vlcap-toy", "0.3", "third-party test method")
    assert {"lora", "adapter", "prefix", "toy"} <= set(registry.names("peft"))


def both_named(first, second):
    return rf"'{first}'.*'{second}'|'{second}'.*'{first}'"


def test_duplicate_method_name_fails_naming_both_packages(site):
    install_peft_package(site, "vlcap-dup", "lora", entry_point="dup")
    with pytest.raises(VlcapError, match="PEFT method 'lora' is registered twice") as error:
        load_registry()
    assert error.match(both_named("vlcap", "vlcap-dup"))


def test_duplicate_entry_point_name_is_not_silently_dropped(site):
    # pluggy alone would skip the second "lora" entry point without a word.
    install_peft_package(site, "vlcap-other", "other-lora", entry_point="lora")
    with pytest.raises(VlcapError, match="entry point 'lora' is declared by") as error:
        load_registry()
    assert error.match(both_named("vlcap", "vlcap-other"))


def test_unknown_peft_name_lists_installed_methods():
    result = CliRunner().invoke(main, ["train", "--peft", "nope", "--dry-run", "--preset", "tiny"])
    assert result.exit_code != 0
    assert "unknown PEFT method 'nope'; installed: adapter, lora, none, prefix" in result.output
    assert "Traceback" not in result.output


def test_python_dash_m_runs_the_cli():
    out = subprocess.run([sys.executable, "-m", "vlcap", "--help"], capture_output=True, text=True, check=True).stdout
    assert "list-plugins" in out and "train" in out


def plugin_options(*args):
    result = CliRunner().invoke(main, ["list-plugins", "--options", *args], terminal_width=200, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return result.output


def option_rows(table, plugin):
    """The (option, type, default) cells of ``plugin``'s rows in the --options table."""
    rows = [[cell.strip() for cell in line.split("│")[1:-1]] for line in table.splitlines() if "│" in line]
    return [tuple(row[2:]) for row in rows if row[0] == plugin]


def test_list_plugins_options_shows_types_and_defaults():
    table = plugin_options()
    rows = [(name, kind.split()[0], default) for name, kind, default in option_rows(table, "lora") if name]
    assert rows == [("r", "int", "8"), ("alpha", "int", "16"), ("dropout", "float", "0.05"),
                    ("targets", "list[str]", '["q", "v"]'), ("layers", "Union[str,", '"all"')]
    assert ("max_length", "Optional[int]", "null") in option_rows(table, "beam")
    assert option_rows(table, "greedy") == [("(no options)", "", "")]
    assert option_rows(table, "cider") == [("(no options)", "", "")]  # metrics have no config_class


def test_list_plugins_options_json():
    entries = {e["name"]: e for e in json.loads(plugin_options("--json"))}
    lora = {o["name"]: o for o in entries["lora"]["options"]}
    assert list(lora) == ["r", "alpha", "dropout", "targets", "layers"]
    assert lora["targets"] == {"name": "targets", "type": "list[str]", "default": ["q", "v"], "required": False}
    assert lora["dropout"]["type"] == "float >= 0, < 1"  # the range the option is checked against
    assert {"name": "num_beams", "type": "int >= 1, <= 256", "default": 3, "required": False} in entries["beam"]["options"]
    assert entries["greedy"]["options"] == [] and entries["greedy"]["kind"] == "decoding"


def test_list_plugins_help_names_the_options_view():
    assert "--options" in CliRunner().invoke(main, ["list-plugins", "--help"]).output
    both = CliRunner().invoke(main, ["list-plugins", "--options", "--hooks"])
    assert both.exit_code != 0 and "pass one of them" in both.output


def test_plugin_option_table_prints_names_and_defaults_as_text():
    from dataclasses import dataclass
    from rich.console import Console
    from vlcap.apps.reports import plugin_options_table
    from vlcap.core.plugins import PluginEntry

    @dataclass
    class Options:
        style: str = "[bold]x"

    class Odd:
        config_class = Options

    console = Console(record=True, width=200)
    console.print(plugin_options_table([PluginEntry("odd[x]", "peft", "pkg", "1", "", Odd())]))
    assert option_rows(console.export_text(), "odd[x]") == [("style", "str", '"[bold]x"')]


FAILING_PLUGINS = """
import vlcap
from vlcap.api import DecodingStrategy, Metric, PeftMethod

class Broken(PeftMethod):
    name = "broken"
    def apply(self, captioner, config):
        raise KeyError("c_attn")

class BrokenDecoding(DecodingStrategy):
    name = "broken_decoding"
    def generate(self, model, config, *, start_id, end_id, max_length):
        return 1 / 0

class BrokenMetric(Metric):
    name = "broken_metric"
    def score(self, predictions, references, image_paths, config):
        raise RuntimeError("scorer crashed\\nwith a second line")

@vlcap.hookimpl
def register_peft_methods(register):
    register(Broken())

@vlcap.hookimpl
def register_decoding_strategies(register):
    register(BrokenDecoding())

@vlcap.hookimpl
def register_metrics(register):
    register(BrokenMetric())

@vlcap.hookimpl
def register_metric(register):  # a typo: not a vlcap hook
    pass
"""


def test_plugin_failures_at_run_time_name_the_plugin_and_its_package(site):
    from vlcap.core.errors import VlcapWarning
    from vlcap.core.model.captioner import build_captioner
    from vlcap.core.eval.metrics import run_metric
    from vlcap.testing.builders import generate, tiny_captioner, tiny_config
    install_package(site, "vlcap-broken", "vlcap_broken", FAILING_PLUGINS)
    with pytest.warns(VlcapWarning, match="plugin 'vlcap_broken' of package 'vlcap-broken' implements 'register_metric', "
                                          "which is not a vlcap hook.*did you mean register_metrics\\?"):
        registry = load_registry()
    with pytest.raises(VlcapError, match=r"^PEFT method 'broken' of package 'vlcap-broken' 0.3 failed in apply: "
                                         r"KeyError: 'c_attn'; this is a fault of that plugin"):
        build_captioner(tiny_config("broken"), registry, meta=True)
    captioner, tokenizer = tiny_captioner("lora", registry)
    with pytest.raises(VlcapError, match="^decoding strategy 'broken_decoding' of package 'vlcap-broken' 0.3 failed "
                                         "in generate: ZeroDivisionError"):
        generate(captioner, tokenizer, registry.get("decoding", "broken_decoding"), {}, cached=True, images=1)
    metric = registry.get("metric", "broken_metric")
    with pytest.raises(VlcapError, match="^metric 'broken_metric' of package 'vlcap-broken' 0.3 failed in score: "
                                         "RuntimeError: scorer crashed;") as error:
        run_metric(metric, None, {}, {})  # as the trainer's validation and `vlcap evaluate` call every metric
    assert "\n" not in str(error.value)
