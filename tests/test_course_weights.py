"""Loading the pretrained parts: the course's decoder_model.bin is checked before anything is
downloaded, a file that does not fit the config says how it differs, and an unreachable hub
fails fast instead of retrying."""
import pytest
import torch

from conftest import tiny_config
from vlcap.core.errors import VlcapError
from vlcap.core.model import encoder as encoder_module
from vlcap.core.model.captioner import build_captioner
from vlcap.core.model.course_weights import course_state_dict, save_course_weights
from vlcap.core.model.gpt2 import GPT2Decoder


def decoder_file(tmp_path, **sizes):
    cfg = tiny_config().model.decoder
    decoder = GPT2Decoder(type(cfg)(**{**cfg.__dict__, **sizes}))
    path = tmp_path / "decoder_model.bin"
    save_course_weights(decoder, path)
    return path


@pytest.fixture
def no_download(monkeypatch):
    """Fail the test if the encoder is built (it would fetch pretrained weights)."""
    def refuse(*args, **kwargs):
        raise AssertionError("the encoder was built before the decoder weights were checked")
    monkeypatch.setattr(encoder_module.timm, "create_model", refuse)


@pytest.mark.parametrize("sizes, message", [
    ({"n_layer": 3}, "holds a 3-layer decoder but the config has 2 layers"),
    ({"n_embd": 32}, r"wte.weight has shape \(50257, 32\) but the decoder config needs \(50257, 64\)"),
])
def test_a_decoder_of_another_size_says_which_size_differs_before_any_download(tmp_path, registry, no_download,
                                                                             sizes, message):
    path = decoder_file(tmp_path, **sizes)
    with pytest.raises(VlcapError, match=message):
        build_captioner(tiny_config(), registry, decoder_weights=path)


def test_a_missing_decoder_file_is_reported_before_any_download(tmp_path, registry, no_download):
    with pytest.raises(VlcapError, match="decoder weights not found"):
        build_captioner(tiny_config(), registry, decoder_weights=tmp_path / "nope.bin")


def test_values_that_are_not_tensors_are_one_line(tmp_path, registry, no_download):
    state = dict(course_state_dict(GPT2Decoder(tiny_config().model.decoder)))
    state["ln_f.bias"] = [0.0] * 64
    path = tmp_path / "decoder_model.bin"
    torch.save(state, path)
    with pytest.raises(VlcapError, match="'ln_f.bias' holds a list, not a tensor"):
        build_captioner(tiny_config(), registry, decoder_weights=path)


def test_a_matching_file_loads(tmp_path, registry):
    path = decoder_file(tmp_path)
    decoder = build_captioner(tiny_config(), registry, decoder_weights=path).captioner.decoder
    assert torch.equal(decoder.wte.weight, torch.load(path, weights_only=True)["wte.weight"])


def test_an_unreachable_hub_puts_the_hub_client_offline_for_the_encoder(monkeypatch):
    from huggingface_hub import constants
    seen = []

    def create_model(name, pretrained, num_classes):
        seen.append(constants.HF_HUB_OFFLINE)
        raise OSError("not in the local cache")

    monkeypatch.setattr(encoder_module, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(encoder_module.timm, "create_model", create_model)
    with pytest.raises(VlcapError, match="could not fetch pretrained weights for encoder 'vit_base_patch16_224'"):
        encoder_module.ImageEncoder("vit_base_patch16_224", pretrained=True)
    assert seen == [True] and constants.HF_HUB_OFFLINE is False  # offline only while creating it


def test_loading_with_another_decoder_of_the_same_size_warns(run_dir, tmp_path, registry):
    import warnings
    from vlcap.core.errors import VlcapWarning
    from vlcap.core.model.checkpoint import load_checkpoint, read_metadata
    checkpoint = run_dir / "best.safetensors"
    assert len(read_metadata(checkpoint)["decoder_fingerprint"]) == 16
    with warnings.catch_warnings():
        warnings.simplefilter("error", VlcapWarning)
        load_checkpoint(checkpoint, registry)  # the decoder it was trained on: no warning
    torch.manual_seed(1)
    other = tmp_path / "other_decoder_model.bin"
    save_course_weights(GPT2Decoder(tiny_config().model.decoder), other)
    with pytest.warns(VlcapWarning, match=r"trained on top of decoder weights [0-9a-f]{16}, but .*other_decoder_model.bin gives"):
        load_checkpoint(checkpoint, registry, decoder_weights=other)
