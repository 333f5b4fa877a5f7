"""The conformance kit: what every PEFT method, decoding strategy, metric and connector plugin must satisfy.

vlcap's own plugins run it in vlcap's suite; a plugin package runs it against itself, either
through the pytest plugin vlcap installs (``pytest --vlcap-plugin NAME``, see
``vlcap.testing.pytest_plugin``) or by calling the helpers from its own tests::

    import pytest
    from vlcap.testing import PEFT_CHECKS, check_peft_method

    @pytest.mark.parametrize("check", PEFT_CHECKS)
    def test_prompt_conforms(check):
        check_peft_method("prompt", check)

Every check builds the ``tiny`` preset (random weights, offline) with the plugin's options
(``options=``, else ``--vlcap-plugin-option``, else its defaults), except ``budget``, which builds
the full-size model as shapes only. The PEFT and decoding checks run under every installed
connector (``connector=``: under that one only); ``check_connector`` checks a connector plugin
itself (with no PEFT method). A check a plugin does not claim (``merge`` without ``can_merge``,
``zero_init`` without ``zero_init``, ``perfect_caption`` for a reference-free metric) skips, as
does a metric check where the metric's ``check`` says it cannot run.
"""
from vlcap.testing.kit import (CONNECTOR_CHECKS, DECODING_CHECKS, METRIC_CHECKS, PEFT_CHECKS, check_connector,
                               check_decoding_strategy, check_metric, check_peft_method)

__all__ = ["PEFT_CHECKS", "DECODING_CHECKS", "METRIC_CHECKS", "CONNECTOR_CHECKS", "check_peft_method",
           "check_decoding_strategy", "check_metric", "check_connector"]
