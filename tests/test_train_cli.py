"""`vlcap train`, `inspect`, `demo` as a user runs them."""
import json
import re

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file

from conftest import PEFT_METHODS, SHARED, data_overrides, install_package, needs_shared, tiny_config, vlcap_cli
from vlcap.core import config as config_lib
from vlcap.core.model.captioner import tokenizer_for
from vlcap.core.data import load_captions
from vlcap.apps.demo import pretrain_decoder
from vlcap.core.model.course_weights import load_course_weights
from vlcap.core.model.gpt2 import GPT2Decoder
from vlcap.core.plugins import load_registry
from vlcap.core.train.trainer import train


def run(*args):
    return vlcap_cli(*args)


def train_args(data, train_split="train", val_split="val", images="images_{}"):
    return ["--train-json", data / f"{train_split}.json", "--train-images", data / images.format(train_split),
            "--val-json", data / f"{val_split}.json", "--val-images", data / images.format(val_split)]


def check_run(out, output):
    reported = int(re.search(r"([\d,]+) trainable parameters", output).group(1).replace(",", ""))
    for name in ("best.safetensors", "last.safetensors"):
        tensors = load_file(out / name)
        assert sum(t.numel() for t in tensors.values()) <= reported < 35_000_000
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["model"]["decoder_weights"] == str((out / "decoder_model.bin").resolve())
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert history and all(r["train_loss"] > 0 and "val_loss" in r for r in history)
    return reported


@pytest.mark.parametrize("method", PEFT_METHODS)
def test_train_tiny_writes_exactly_the_trainable_parameters(tmp_path, synthetic, method):
    out = tmp_path / "run"
    result = run("train", "--preset", "tiny", "--peft", method, *train_args(synthetic), "--out", out,
                 "--max-steps", 3, "--batch-size", 8, "--set", "peft.options.layers=all")
    assert result.exit_code == 0, result.output
    reported = check_run(out, result.output)
    if method != "prefix":  # prefix saves its reparameterised form, fewer parameters
        assert sum(t.numel() for t in load_file(out / "last.safetensors").values()) == reported
    inspected = run("inspect", out / "last.safetensors", "--json")
    assert json.loads(inspected.output)["peft"]["name"] == method
    table = run("inspect", out / "last.safetensors")
    assert method in table.output and "cross-attention" in table.output
    decoder = torch.load(out / "decoder_model.bin", weights_only=True)
    assert decoder["h.0.mlp.c_fc.weight"].shape == (64, 256)  # course layout, (in, out)


@needs_shared
@pytest.mark.parametrize("method", PEFT_METHODS)
def test_train_on_real_flickr8k_photos(tmp_path, method):
    data = SHARED / "data/flickr8k_1k"
    out = tmp_path / method
    result = run("train", "--preset", "tiny", "--peft", method, *train_args(data), "--out", out,
                 "--max-steps", 2, "--batch-size", 8, "--set", "train.max_val_images=8")
    assert result.exit_code == 0, result.output
    check_run(out, result.output)


def test_training_is_reproducible(tmp_path, synthetic):
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        assert run("train", "--preset", "tiny", "--peft", "adapter", *train_args(synthetic), "--out", out,
                   "--max-steps", 2, "--batch-size", 8).exit_code == 0
    first, second = (load_file(o / "last.safetensors") for o in outs)
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("encoder", ["vit_base_patch16_clip_224.openai", "vit_large_patch14_clip_224.openai"])
def test_full_size_dry_run_stays_under_budget(encoder):
    # (every method's budget at full size is the conformance kit's)
    result = run("train", "--dry-run", "--peft", "lora", "--encoder", encoder)
    assert result.exit_code == 0, result.output
    trainable = int(re.search(r"trainable: ([\d,]+) of the", result.output).group(1).replace(",", ""))
    assert 28_366_848 < trainable < 35_000_000  # cross-attention alone is 28,366,848
    assert "124,439,808" in result.output  # GPT-2 small, frozen


def test_dry_run_over_budget_fails_clearly():
    result = run("train", "--dry-run", "--peft", "adapter", "--set", "peft.options.reduction=1")
    assert result.exit_code != 0
    assert "over the 35,000,000 budget" in result.output


def test_yaml_config_and_set_overrides_are_resolved_and_saved(tmp_path, synthetic):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"peft": {"method": "lora", "options": {"r": 2}}, "train": {"lr": 0.01}}))
    out = tmp_path / "run"
    result = run("train", "--preset", "tiny", "--config", config, "--set", "peft.options.alpha=4",
                 "--set", "train.warmup_steps=1", *train_args(synthetic), "--out", out, "--max-steps", 1)
    assert result.exit_code == 0, result.output
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["peft"]["options"] == {"r": 2, "alpha": 4, "dropout": 0.05, "targets": ["q", "v"], "layers": "all"}
    assert saved["train"]["lr"] == 0.01 and saved["train"]["warmup_steps"] == 1


@pytest.mark.parametrize("args, message", [
    (["--set", "train.nope=1"], r"unknown key train.nope; known: epochs"),
    (["--set", "oops"], "expected KEY=VALUE"),
    (["--config", "missing.yaml"], "missing.yaml: config file not found"),
    (["--train-json", "missing.json", "--train-images", "."], "missing.json: caption file not found"),
    (["--set", "model.decoder.vocab_size=1000"], "tokenizer has 50257 tokens but the decoder expects 1000"),
])
def test_bad_training_input_is_one_line(tmp_path, args, message):
    result = run("train", "--preset", "tiny", "--out", tmp_path / "r", *args)
    assert result.exit_code != 0 and re.search(message, result.output), result.output


def test_full_preset_without_decoder_weights_says_what_to_pass(tmp_path, synthetic):
    result = run("train", "--encoder", "test_vit", "--set", "model.encoder_pretrained=false",
                 *train_args(synthetic), "--out", tmp_path / "r")
    assert result.exit_code != 0 and "--decoder-weights PATH/decoder_model.bin" in result.output


def test_missing_images_are_named(tmp_path, synthetic):
    broken = tmp_path / "train.json"
    data = json.loads((synthetic / "train.json").read_text())
    data["images"][0]["file_name"] = "gone.png"
    broken.write_text(json.dumps(data))
    result = run("train", "--preset", "tiny", "--train-json", broken, "--train-images", synthetic / "images_train",
                 "--out", tmp_path / "r")
    assert result.exit_code != 0 and "1 image file(s) missing" in result.output and "gone.png" in result.output


def test_demo_runs_end_to_end(tmp_path):
    result = run("demo", "--out", tmp_path / "demo", "--steps", 4, "--peft", "adapter")
    assert result.exit_code == 0, result.output
    assert "vlcap demo" in result.output and "adapter" in result.output
    for connector in ("cross-attention", "visual-tokens"):  # both designs, trained and reported
        assert (tmp_path / f"demo/runs/{connector}/adapter/best.safetensors").exists()
        assert connector in result.output
    # PEFT trained on the language-model-trained decoder, not on a random one
    assert "trained as a language model" in result.output
    config = (tmp_path / "demo/runs/visual-tokens/adapter/config.yaml").read_text()
    assert str((tmp_path / "demo/decoder_model.bin").resolve()) in config


METRIC_PLUGIN = """
import vlcap
from vlcap.api import Metric, MetricScores

class Length(Metric):
    name = "words"
    description = "mean caption length in words (test metric)"
    higher_is_better = True

    def score(self, predictions, references, image_paths, config):
        assert set(predictions) == set(references) <= set(image_paths)
        words = {stem: len(caption.split()) for stem, caption in predictions.items()}
        return MetricScores(sum(words.values()) / len(words), words)

@vlcap.hookimpl
def register_metrics(register):
    register(Length())
"""


def test_hook_register_metrics(tmp_path, synthetic, site):
    install_package(site, "vlcap-words", "vlcap_words", METRIC_PLUGIN)
    registry = load_registry()
    cfg = tiny_config("lora", **data_overrides(synthetic), train={"max_steps": 6, "batch_size": 60,
                                                                  "max_val_images": 3, "metrics": ["words"]})
    result = train(cfg, tmp_path / "run", registry)
    assert len(result.history) == 3 and all("words" in record for record in result.history)
    # Ties keep the earlier epoch; best.safetensors equals last.safetensors only if the last won.
    best_epoch = max(range(3), key=lambda i: (result.history[i]["words"], -i))
    best, last = load_file(result.best_checkpoint), load_file(result.last_checkpoint)
    assert all(torch.equal(best[k], last[k]) for k in best) == (best_epoch == 2)


def test_demo_decoder_learns_the_caption_language(tmp_path, synthetic):
    """The demo's stand-in for pretrained GPT-2: a course-format decoder_model.bin whose language
    model loss on the captions is far below a random decoder's."""
    cfg = config_lib.resolve("tiny")
    captions = load_captions(synthetic / "train.json").captions
    pretrain_decoder(cfg, captions, tmp_path / "decoder_model.bin", steps=15)
    tokenizer = tokenizer_for(cfg)
    inputs, labels = (torch.tensor([tokenizer.training_pair(text, 40)[part] for _, text in captions[:1]]) for part in (0, 1))

    def loss(decoder):
        with torch.no_grad():
            logits = decoder(inputs, torch.zeros(1, 1, cfg.model.decoder.n_embd))
        return float(F.cross_entropy(logits.flatten(0, 1), labels.flatten()))
    trained = GPT2Decoder(cfg.model.decoder)
    load_course_weights(trained, tmp_path / "decoder_model.bin")
    assert loss(trained) < loss(GPT2Decoder(cfg.model.decoder)) / 3
