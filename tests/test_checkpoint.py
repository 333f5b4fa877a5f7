"""Trainable-only safetensors checkpoints: exact round trips and refusal of mismatched files."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import tiny_config
from vlcap.core.model import peft as peft_lib
from vlcap.core.model.checkpoint import load_checkpoint, read_metadata, save_checkpoint
from vlcap.core.errors import VlcapError
from vlcap.core.train.trainer import prepare_model


def trained_like(registry, tmp_path, method, **options):
    """A tiny captioner whose trainable parameters are all non-trivial, plus its checkpoint."""
    cfg = tiny_config(method, peft={"options": options})
    tokenizer, captioner, plugin, cfg = prepare_model(cfg, registry, tmp_path)
    with torch.no_grad():
        for p in captioner.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path / "ckpt.safetensors"
    saved = save_checkpoint(path, captioner, plugin, cfg, tokenizer, registry)
    return captioner.eval(), path, saved


def test_checkpoint_holds_exactly_the_trainable_parameters(registry, tmp_path):
    # (save -> load giving the same logits is the conformance kit's, for every method)
    captioner, path, saved = trained_like(registry, tmp_path, "lora")
    trainable = {n for n, p in captioner.named_parameters() if p.requires_grad}
    assert set(load_file(path)) == trainable
    assert saved == read_metadata(path)["parameters"] == peft_lib.count_parameters(captioner).trainable


def test_metadata_describes_the_run(registry, tmp_path):
    _, path, _ = trained_like(registry, tmp_path, "adapter", reduction=8)
    meta = read_metadata(path)
    assert meta["peft"]["name"] == "adapter" and meta["peft"]["package"] == "vlcap" and meta["peft"]["version"]
    assert meta["encoder"] == "test_vit" and len(meta["tokenizer"]) == 16
    assert (meta["encoder_width"], meta["encoder_tokens"]) == (64, 101)  # test_vit: 1 CLS + 10 x 10 patches
    assert meta["config"]["peft"]["options"]["reduction"] == 8
    assert meta["config"]["model"]["decoder_weights"] == str((tmp_path / "decoder_model.bin").resolve())


def test_prefix_reparameterisation_is_dropped_at_save(registry, tmp_path, batch):
    captioner, path, saved = trained_like(registry, tmp_path, "prefix", length=3, hidden=16)
    keys = set(load_file(path))
    assert "peft.prefix.kv" in keys and not any("mlp" in k or "embedding" in k for k in keys)
    assert saved < peft_lib.count_parameters(captioner).trainable
    loaded = load_checkpoint(path, registry)
    assert loaded.config.peft.options["reparam"] is False
    with torch.no_grad():
        torch.testing.assert_close(loaded.captioner(*batch), captioner(*batch), rtol=1e-5, atol=1e-5)


def rewrite(path, change):
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(path)
    change(tensors, metadata)
    save_file(tensors, path, metadata=metadata)


@pytest.mark.parametrize("change, message", [
    (lambda t, m: t.update({"decoder.h.0.extra": torch.zeros(3)}), "altered|unused keys: decoder.h.0.extra"),
    (lambda t, m: (t.update({"decoder.h.0.extra": torch.zeros(3)}), m.update(parameters=str(int(m["parameters"]) + 3))),
     "unused keys: decoder.h.0.extra"),
    (lambda t, m: (t.pop("projection.bias"), m.update(parameters=str(int(m["parameters"]) - 64))),
     "without a value: projection.bias"),
    (lambda t, m: (t.update({"projection.bias": torch.zeros(65)}), m.update(parameters=str(int(m["parameters"]) + 1))),
     r"projection.bias has shape \(65,\)"),
    (lambda t, m: m.update(parameters="36000000"), "altered"),
    (lambda t, m: m.update(format="something-else"), "not a vlcap checkpoint"),
    (lambda t, m: m.update(config="{"), "damaged vlcap metadata"),
])
def test_tampered_checkpoints_are_refused(registry, tmp_path, change, message):
    _, path, _ = trained_like(registry, tmp_path, "lora")
    rewrite(path, change)
    with pytest.raises(VlcapError, match=message):
        load_checkpoint(path, registry)


def test_encoder_features_other_than_recorded_are_refused_in_one_line(registry, tmp_path, batch):
    captioner, path, _ = trained_like(registry, tmp_path, "lora")
    rewrite(path, lambda t, m: m.update(encoder_tokens="197"))
    with pytest.raises(VlcapError) as error:
        load_checkpoint(path, registry)
    message = str(error.value)
    assert message.startswith(f"{path}: trained on 64-wide x 197 feature tokens of encoder 'test_vit'")
    assert "gives 64-wide x 101 here" in message and "\n" not in message

    rewrite(path, lambda t, m: (m.pop("encoder_width"), m.pop("encoder_tokens")))  # written before they were recorded
    loaded = load_checkpoint(path, registry)
    assert "encoder_width" not in loaded.metadata
    with torch.no_grad():
        torch.testing.assert_close(loaded.captioner(*batch), captioner(*batch), rtol=1e-5, atol=1e-5)


def test_over_budget_is_refused_on_save_and_load(registry, tmp_path, monkeypatch):
    _, path, saved = trained_like(registry, tmp_path, "lora")
    monkeypatch.setattr(peft_lib, "MAX_TRAINABLE", saved - 1)
    with pytest.raises(VlcapError, match="over the .* budget"):
        load_checkpoint(path, registry)
    with pytest.raises(VlcapError, match="over the .* budget"):
        trained_like(registry, tmp_path / "again", "lora")
    assert not (tmp_path / "again" / "ckpt.safetensors").exists()


def test_not_a_checkpoint(tmp_path, registry):
    (tmp_path / "x.safetensors").write_text("hello")
    with pytest.raises(VlcapError, match="x.safetensors: not a safetensors file"):
        load_checkpoint(tmp_path / "x.safetensors", registry)
    with pytest.raises(VlcapError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.safetensors", registry)


def test_metadata_is_json_readable(registry, tmp_path):
    _, path, _ = trained_like(registry, tmp_path, "lora")
    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata()
    assert json.loads(raw["config"])["peft"]["method"] == "lora"


def test_a_checkpoint_records_the_epoch_step_and_scores_it_was_saved_at(tmp_path, small_synthetic, registry):
    from conftest import data_overrides
    from vlcap.core.train.trainer import TIMING_KEYS, train
    cfg = tiny_config("lora", **data_overrides(small_synthetic), train={"epochs": 2, "batch_size": 8, "metrics": []})
    result = train(cfg, tmp_path / "run", registry)
    assert result.best in result.history and result.best["val_loss"] == min(r["val_loss"] for r in result.history)
    best, last = read_metadata(result.best_checkpoint)["training"], read_metadata(result.last_checkpoint)["training"]
    assert best == result.best and last == result.history[-1]
    assert set(best) == {"epoch", "step", "train_loss", "val_loss", "lr", *TIMING_KEYS}
