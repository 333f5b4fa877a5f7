"""vlcap's pytest plugin (entry point ``pytest11``, loaded by pytest wherever vlcap is installed).

It adds ``--vlcap-plugin NAME`` (repeatable), ``--vlcap-plugin-option KEY=VALUE`` (repeatable;
``NAME.KEY=VALUE`` for one plugin only), the ini setting ``vlcap_packages`` and parametrises eight
arguments any test may take:

- ``vlcap_peft_method``: the installed PEFT methods selected (see below),
- ``vlcap_peft_check``: every key of ``vlcap.testing.PEFT_CHECKS``,
- ``vlcap_decoding_strategy`` / ``vlcap_decoding_check``, ``vlcap_metric`` / ``vlcap_metric_check``
  and ``vlcap_connector`` / ``vlcap_connector_check``: the same for decoding strategies, metrics
  and connectors (the PEFT and decoding checks run under every installed connector).

So the whole kit, for whichever plugins are asked for, is::

    from vlcap.api import check_connector, check_decoding_strategy, check_metric, check_peft_method

    def test_peft_conformance(vlcap_peft_method, vlcap_peft_check):
        check_peft_method(vlcap_peft_method, vlcap_peft_check)

    def test_decoding_conformance(vlcap_decoding_strategy, vlcap_decoding_check):
        check_decoding_strategy(vlcap_decoding_strategy, vlcap_decoding_check)

    def test_metric_conformance(vlcap_metric, vlcap_metric_check):
        check_metric(vlcap_metric, vlcap_metric_check)

    def test_connector_conformance(vlcap_connector, vlcap_connector_check):
        check_connector(vlcap_connector, vlcap_connector_check)

Selected: the plugins named by ``--vlcap-plugin``; else those of the distribution packages in
the ini setting ``vlcap_packages`` (a package's own ``pyproject.toml`` sets it, so its bare
``pytest`` checks only its own plugins); else every installed one. The options given by
``--vlcap-plugin-option`` are what the checks build the plugins with (connectors' checks take
none). (The kit itself is imported only when a test asks for these arguments, so other
projects' test runs do not pay.)
"""
import pytest

ARGUMENTS = {  # argument -> (plugin kind, the argument naming the checks for it)
    "vlcap_peft_method": ("peft", "vlcap_peft_check"),
    "vlcap_decoding_strategy": ("decoding", "vlcap_decoding_check"),
    "vlcap_metric": ("metric", "vlcap_metric_check"),
    "vlcap_connector": ("connector", "vlcap_connector_check"),
}
KIT_KINDS = ("peft", "decoding", "metric", "connector")
OPTION_KINDS = ("peft", "decoding", "metric")  # the kinds whose checks take options


def pytest_addoption(parser):
    group = parser.getgroup("vlcap", "vlcap plugin conformance kit")
    group.addoption("--vlcap-plugin", action="append", default=[], metavar="NAME",
                    help="Run the vlcap conformance kit for this installed PEFT method, decoding strategy, "
                         "metric or connector only (repeatable; default: the vlcap_packages ini setting's, "
                         "else every one).")
    group.addoption("--vlcap-plugin-option", action="append", default=[], metavar="KEY=VALUE",
                    help="An option the kit builds the selected plugins with (repeatable; NAME.KEY=VALUE for "
                         "plugin NAME only; VALUE is read as YAML: 16, true, [q, v]).")
    parser.addini("vlcap_packages", type="args", default=[],
                  help="Distribution packages whose plugins the vlcap kit checks when no --vlcap-plugin is given.")


def installed_names():
    from vlcap.core.plugins import registry
    return {name for kind in KIT_KINDS for name in registry().names(kind)}


def pytest_configure(config):
    names = config.getoption("vlcap_plugin")
    assignments = config.getoption("vlcap_plugin_option")
    if not names and not assignments and not config.getini("vlcap_packages"):
        return  # nothing asked of the kit: vlcap is not imported
    from vlcap.core.plugins import registry
    everything = installed_names()
    unknown = [n for n in names if n not in everything]
    if unknown:  # checked up front, so a typo is a usage error rather than an empty test run
        raise pytest.UsageError(f"--vlcap-plugin {', '.join(unknown)}: not an installed PEFT method, decoding "
                                f"strategy, metric or connector; installed: {', '.join(sorted(everything))}")
    from vlcap.core.plugins import canonical
    packages = [canonical(p) for p in config.getini("vlcap_packages")]
    known = {canonical(entry.package) for entry in registry().entries()}
    missing = [p for p in packages if p not in known]
    if missing:
        raise pytest.UsageError(f"vlcap_packages names {', '.join(missing)}, which provide(s) no installed vlcap "
                                f"plugin; pip install it (installed plugin packages: {', '.join(sorted(known))})")
    set_options(config, assignments, names or [e.name for e in registry().entries() if e.kind in OPTION_KINDS
                                       and (not packages or canonical(e.package) in packages)])


_SAVED = "_vlcap_saved_options"


def pytest_unconfigure(config):
    saved = getattr(config, _SAVED, None)
    if saved is not None:  # this session's options end with it (a session run inside another one)
        from vlcap.testing.kit import CONFIGURED_OPTIONS
        CONFIGURED_OPTIONS.clear()
        CONFIGURED_OPTIONS.update(saved)


def set_options(config, assignments, selected):
    """``--vlcap-plugin-option`` values into the kit's per-plugin options (until the session ends)."""
    from vlcap.core.config import read_yaml
    from vlcap.testing.kit import CONFIGURED_OPTIONS
    setattr(config, _SAVED, {name: dict(options) for name, options in CONFIGURED_OPTIONS.items()})
    for item in assignments:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise pytest.UsageError(f"--vlcap-plugin-option {item!r}: expected KEY=VALUE or NAME.KEY=VALUE")
        name, dot, option = key.rpartition(".")
        targets = [name] if dot else selected
        if dot and name not in selected:
            raise pytest.UsageError(f"--vlcap-plugin-option {item!r}: '{name}' is not a selected plugin "
                                    f"({', '.join(selected)})")
        for target in targets:
            CONFIGURED_OPTIONS.setdefault(target, {})[option] = read_yaml(raw) if raw else None


def selected(config, kind):
    from vlcap.core.plugins import canonical, registry
    entries = registry().entries(kind)
    names = config.getoption("vlcap_plugin")
    packages = [canonical(p) for p in config.getini("vlcap_packages")]
    if names:
        return [e.name for e in entries if e.name in names]
    return [e.name for e in entries if not packages or canonical(e.package) in packages]


def pytest_generate_tests(metafunc):
    wanted = set(ARGUMENTS) | {check for _, check in ARGUMENTS.values()}
    if not wanted & set(metafunc.fixturenames):
        return
    from vlcap.testing import CONNECTOR_CHECKS, DECODING_CHECKS, METRIC_CHECKS, PEFT_CHECKS
    checks = {"vlcap_peft_check": PEFT_CHECKS, "vlcap_decoding_check": DECODING_CHECKS,
              "vlcap_metric_check": METRIC_CHECKS, "vlcap_connector_check": CONNECTOR_CHECKS}
    for argument, (kind, check_argument) in ARGUMENTS.items():
        if argument in metafunc.fixturenames:
            metafunc.parametrize(argument, selected(metafunc.config, kind))
        if check_argument in metafunc.fixturenames:
            metafunc.parametrize(check_argument, list(checks[check_argument]))
