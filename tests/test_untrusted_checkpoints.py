"""Checkpoints that were passed around and edited: refused with a message before any tensor is
used, and nothing named in a file is ever imported."""
import json
import pickle
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import tiny_config
from vlcap.core.model.checkpoint import load_checkpoint, save_checkpoint
from vlcap.core.errors import VlcapError
from vlcap.core.model.course_weights import load_course_weights
from vlcap.core.model.gpt2 import GPT2Decoder
from vlcap.core.train.trainer import prepare_model


@pytest.fixture(scope="module")
def checkpoint(registry, tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    cfg = tiny_config("lora")
    tokenizer, captioner, method, cfg = prepare_model(cfg, registry, root)
    save_checkpoint(root / "good.safetensors", captioner, method, cfg, tokenizer, registry)
    return root / "good.safetensors"


def tampered(checkpoint, tmp_path, change):
    with safe_open(str(checkpoint), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(checkpoint)
    metadata["config"], metadata["peft"] = json.loads(metadata["config"]), json.loads(metadata["peft"])
    change(tensors, metadata)
    metadata = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    path = tmp_path / "tampered.safetensors"
    save_file(tensors, path, metadata=metadata)
    return path


def edit_config(section, key, value):
    return lambda t, m: m["config"][section].update({key: value})


def count(m, delta):
    m["parameters"] = str(int(m["parameters"]) + delta)


@pytest.mark.parametrize("change, message", [
    # a tensor of the wrong shape, the count edited to match
    (lambda t, m: (t.update({"projection.weight": torch.zeros(64, 65)}), count(m, 64)),
     r"projection.weight has shape \(64, 65\), the model needs \(64, 64\)"),
    # an extra tensor, the count edited to match
    (lambda t, m: (t.update({"decoder.h.0.mlp.evil": torch.zeros(2)}), count(m, 2)), "unused keys: decoder.h.0.mlp.evil"),
    # the parameter count alone edited
    (lambda t, m: count(m, -1), "metadata says .*; the file was altered"),
    (lambda t, m: m.update(parameters="36000000"), "metadata says 36,000,000; the file was altered"),
    # the config edited so the model it describes has other shapes
    (lambda t, m: m["config"]["peft"]["options"].update(r=4), "has shape .*, the model needs"),
    (lambda t, m: m["config"]["model"]["decoder"].update(n_embd=32, n_head=2), "has shape .*, the model needs"),
    (edit_config("train", "unknown", 1), r"metadata: unknown key train.unknown"),
    # the PEFT entry edited: another name, a module path, a non-mapping
    (lambda t, m: m["peft"].update(name="adapter"), "metadata names PEFT method 'adapter' but its config says 'lora'"),
    (lambda t, m: m["peft"].update(name="os:system"), "damaged vlcap metadata.*'os:system' is not a valid name"),
    (lambda t, m: m.update(peft=["lora"]), "damaged vlcap metadata"),
    # the training record: numbers by name only
    (lambda t, m: m.update(training={"epoch": "\x1b[2J"}), "damaged vlcap metadata.*training"),
    (lambda t, m: m.update(training=[1, 2]), "damaged vlcap metadata.*training"),
    (lambda t, m: m.update(decoder_fingerprint="\x1b]0;pwned\x07"), "damaged vlcap metadata.*decoder_fingerprint"),
    # the schema: values of the wrong type or range, through the same validator as --set
    (edit_config("train", "lr", "fast"), r"metadata: train.lr = 'fast': expected a finite number > 0"),
    (edit_config("train", "batch_size", 10 ** 30), r"metadata: train.batch_size = 1000000000000000000000000000000"),
    (lambda t, m: m["config"]["model"]["decoder"].update(n_layer=10 ** 6), r"metadata: model.decoder.n_layer = 1000000"),
    (lambda t, m: m["config"]["model"]["decoder"].update(n_embd=16384, n_head=16),
     "has shape .*, the model needs"),  # within the ceilings: refused by a shapes-only build, before allocating
    # decoding options bounded
    (lambda t, m: m["config"]["decoding"].update(strategy="beam", options={"num_beams": 10 ** 6}),
     r"metadata: decoding.options.num_beams = 1000000: expected an integer >= 1 and <= 256"),
    (lambda t, m: m["config"]["decoding"].update(max_length=10 ** 6), "decoding.max_length = 1000000 is beyond"),
    # PEFT options asking for far more than the file holds: refused by a shapes-only build
    (lambda t, m: m["config"]["peft"]["options"].update(r=16384), "has shape .*, the model needs"),
    # the encoder: a plain timm name only
    (lambda t, m: m["config"]["model"].update(encoder="hf-hub:evil/model"), "not a plain timm model name"),
    (lambda t, m: m["config"]["model"].update(encoder="local-dir:/tmp/x"), "not a plain timm model name"),
    # names shown in messages are plain names
    (lambda t, m: m["peft"].update(name="ia3", package="x; rm -rf ~"), "damaged vlcap metadata.*not a valid package"),
    (lambda t, m: m["peft"].update(version="1\x1b[2J"), "damaged vlcap metadata.*not a valid version"),
    # deeply nested JSON
    (lambda t, m: m.update(config="[" * 100000 + "]" * 100000), "damaged vlcap metadata"),
    (lambda t, m: m.update(training='{"epoch": ' + "9" * 5000 + "}"), "damaged vlcap metadata"),
])
def test_tampered_checkpoint_is_refused_before_use(checkpoint, tmp_path, registry, change, message):
    with pytest.raises(VlcapError, match=message):
        load_checkpoint(tampered(checkpoint, tmp_path, change), registry)


def test_method_that_is_not_installed_names_the_package(checkpoint, tmp_path, registry):
    def from_elsewhere(t, m):
        m["peft"].update(name="ia3", package="vlcap-ia3", version="0.2")
        m["config"]["peft"]["method"] = "ia3"
    modules = set(sys.modules)
    with pytest.raises(VlcapError, match=r"PEFT method 'ia3' from package 'vlcap-ia3' \(version 0.2\), "
                                         "which is not installed; install that package if you trust"):
        load_checkpoint(tampered(checkpoint, tmp_path, from_elsewhere), registry)
    assert not {m for m in set(sys.modules) - modules if "ia3" in m}  # nothing was imported by that name


class Payload:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_decoder_weights_with_pickled_code_are_refused(tmp_path, capsys):
    path = tmp_path / "decoder_model.bin"
    torch.save({"wte.weight": torch.zeros(2), "x": Payload()}, path)  # what a hostile file would hold
    with pytest.raises(VlcapError, match="decoder_model.bin: not a readable torch state dict"):
        load_course_weights(GPT2Decoder(tiny_config().model.decoder), path)
    assert "pickled code ran" not in capsys.readouterr().out
    path.write_bytes(pickle.dumps(Payload(), protocol=2))
    with pytest.raises(VlcapError, match="not a readable torch state dict"):
        load_course_weights(GPT2Decoder(tiny_config().model.decoder), path)
    assert "pickled code ran" not in capsys.readouterr().out


@pytest.mark.parametrize("state", [{"wte.weight": [1, 2]}, {"h.0.attn.c_attn.weight": 3.0}, {1: torch.zeros(2)},
                                   {"wte.weight": {"nested": torch.zeros(1)}}])
def test_decoder_weights_whose_values_are_not_tensors_are_one_line(tmp_path, state):
    path = tmp_path / "decoder_model.bin"
    torch.save(state, path)
    with pytest.raises(VlcapError, match="decoder_model.bin: .* not a tensor"):
        load_course_weights(GPT2Decoder(tiny_config().model.decoder), path)
