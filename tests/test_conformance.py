"""The conformance kit (vlcap.testing) against every installed connector, PEFT method, decoding
strategy and metric (each PEFT and decoding check under every connector): the built-ins pass
exactly what a third-party plugin must pass."""
from vlcap.api import CLIP_MODEL_ENV
from vlcap.testing import check_connector, check_decoding_strategy, check_metric, check_peft_method


def test_peft_method_conforms(vlcap_peft_method, vlcap_peft_check):
    check_peft_method(vlcap_peft_method, vlcap_peft_check)


def test_decoding_strategy_conforms(vlcap_decoding_strategy, vlcap_decoding_check):
    check_decoding_strategy(vlcap_decoding_strategy, vlcap_decoding_check)


def test_metric_conforms(vlcap_metric, vlcap_metric_check, tiny_clip, monkeypatch):
    monkeypatch.setenv(CLIP_MODEL_ENV, str(tiny_clip))  # CLIPScore with a tiny local CLIP: offline
    check_metric(vlcap_metric, vlcap_metric_check)


def test_connector_conforms(vlcap_connector, vlcap_connector_check):
    check_connector(vlcap_connector, vlcap_connector_check)
