"""The conformance kit (vlcap.testing) against every installed connector, PEFT method and decoding
strategy (each PEFT and decoding check under every connector): the built-ins pass exactly what a
third-party plugin must pass."""
from vlcap.testing import check_connector, check_decoding_strategy, check_peft_method


def test_peft_method_conforms(vlcap_peft_method, vlcap_peft_check):
    check_peft_method(vlcap_peft_method, vlcap_peft_check)


def test_decoding_strategy_conforms(vlcap_decoding_strategy, vlcap_decoding_check):
    check_decoding_strategy(vlcap_decoding_strategy, vlcap_decoding_check)


def test_connector_conforms(vlcap_connector, vlcap_connector_check):
    check_connector(vlcap_connector, vlcap_connector_check)
