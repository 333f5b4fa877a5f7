"""vlcap's pytest plugin (entry point ``pytest11``, loaded by pytest wherever vlcap is installed).

It adds ``--vlcap-plugin NAME`` (repeatable) and parametrises six arguments any test may take:

- ``vlcap_peft_method``: the installed PEFT methods named by ``--vlcap-plugin`` (default: all),
- ``vlcap_peft_check``: every key of ``vlcap.testing.PEFT_CHECKS``,
- ``vlcap_decoding_strategy`` / ``vlcap_decoding_check``: the same for decoding strategies,
- ``vlcap_connector`` / ``vlcap_connector_check``: the same for connectors.

So the whole kit, for whichever plugins are asked for, is::

    from vlcap.testing import check_decoding_strategy, check_peft_method

    def test_peft_conformance(vlcap_peft_method, vlcap_peft_check):
        check_peft_method(vlcap_peft_method, vlcap_peft_check)

    def test_decoding_conformance(vlcap_decoding_strategy, vlcap_decoding_check):
        check_decoding_strategy(vlcap_decoding_strategy, vlcap_decoding_check)

    def test_connector_conformance(vlcap_connector, vlcap_connector_check):
        check_connector(vlcap_connector, vlcap_connector_check)

and ``pytest --vlcap-plugin prompt`` runs it for ``prompt`` only. (The kit itself is imported
only when a test asks for these arguments, so other projects' test runs do not pay for it.)
"""
import pytest

ARGUMENTS = {  # argument -> (plugin kind, the argument naming the checks for it)
    "vlcap_peft_method": ("peft", "vlcap_peft_check"),
    "vlcap_decoding_strategy": ("decoding", "vlcap_decoding_check"),
    "vlcap_connector": ("connector", "vlcap_connector_check"),
}


def pytest_addoption(parser):
    group = parser.getgroup("vlcap", "vlcap plugin conformance kit")
    group.addoption("--vlcap-plugin", action="append", default=[], metavar="NAME",
                    help="Run the vlcap conformance kit for this installed PEFT method, decoding "
                         "strategy or connector only (repeatable; default: every installed one).")


def pytest_configure(config):
    names = config.getoption("vlcap_plugin")
    if names:  # checked up front, so a typo is a usage error rather than an empty test run
        from vlcap.core.plugins import registry
        everything = {name for kind in ARGUMENTS.values() for name in registry().names(kind[0])}
        unknown = [n for n in names if n not in everything]
        if unknown:
            raise pytest.UsageError(f"--vlcap-plugin {', '.join(unknown)}: not an installed PEFT method, "
                                    f"decoding strategy or connector; installed: {', '.join(sorted(everything))}")


def selected(config, kind):
    from vlcap.core.plugins import registry
    installed = registry().names(kind)
    names = config.getoption("vlcap_plugin")
    return [n for n in names if n in installed] if names else installed


def pytest_generate_tests(metafunc):
    wanted = set(ARGUMENTS) | {check for _, check in ARGUMENTS.values()}
    if not wanted & set(metafunc.fixturenames):
        return
    from vlcap.testing import CONNECTOR_CHECKS, DECODING_CHECKS, PEFT_CHECKS
    checks = {"vlcap_peft_check": PEFT_CHECKS, "vlcap_decoding_check": DECODING_CHECKS,
              "vlcap_connector_check": CONNECTOR_CHECKS}
    for argument, (kind, check_argument) in ARGUMENTS.items():
        if argument in metafunc.fixturenames:
            metafunc.parametrize(argument, selected(metafunc.config, kind))
        if check_argument in metafunc.fixturenames:
            metafunc.parametrize(check_argument, list(checks[check_argument]))
