"""Connectors: how the image tokens reach the decoder (cross-attention or visual tokens), as
plugins, with every PEFT method; the kit (test_conformance.py) runs its checks under each."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import SHARED, data_overrides, install_package, needs_shared, tiny_config, vlcap_cli
from vlcap.apps.visualize import Target, visualize
from vlcap.core.errors import VlcapError
from vlcap.core.infer.decoding import generate_tokens, next_token_model
from vlcap.core.model.captioner import build_captioner
from vlcap.core.model.checkpoint import load_checkpoint
from vlcap.core.model.kv_cache import DecoderCache
from vlcap.core.model.peft import count_parameters
from vlcap.core.model.tokenizer import IGNORE_INDEX, Tokenizer
from vlcap.core.plugins import load_registry
from vlcap.testing.builders import perturb_trainable, pixels_for, token_ids

def build(registry, method="lora", connector="visual-tokens", options=None, peft_options=None):
    cfg = tiny_config(method, connector={"name": connector, "options": options or {}},
                      peft={"method": method, "options": peft_options or {}})
    return build_captioner(cfg, registry)


def test_list_plugins_shows_the_connectors(registry):
    result = vlcap_cli("list-plugins", "--json")
    kinds = {(e["name"], e["kind"]) for e in json.loads(result.output)}
    assert {("cross-attention", "connector"), ("visual-tokens", "connector"), ("none", "peft")} <= kinds


def test_image_token_positions_never_reach_ln_f_the_lm_head_or_the_loss(registry):
    captioner = build(registry).captioner.eval()  # no dropout: the two forwards below must agree
    perturb_trainable(captioner)
    seen = {}
    for name in ("ln_f", "lm_head"):
        getattr(captioner.decoder, name).register_forward_pre_hook(
            lambda module, inputs, name=name: seen.__setitem__(name, tuple(inputs[0].shape)))
    pixels, ids = pixels_for(captioner, 2), token_ids(2, 7, 50257)
    labels = ids.clone()
    labels[1, 4:] = IGNORE_INDEX
    loss = captioner.loss(pixels, ids, labels)
    assert seen["ln_f"] == seen["lm_head"] == (7 + 4, 64)  # the labelled text positions, nothing else
    logits = captioner(pixels, ids)
    assert logits.shape == (2, 7, 50257) and seen["lm_head"] == (2, 7, 64)
    expected = torch.nn.functional.cross_entropy(logits[labels != IGNORE_INDEX].float(), labels[labels != IGNORE_INDEX])
    torch.testing.assert_close(loss, expected)
    # the image is read: other images, other logits
    assert not torch.allclose(captioner(pixels.flip(0), ids), logits)


def test_decoding_prefills_the_image_tokens_once_and_shares_them_between_beams(registry):
    captioner = build(registry, method="prefix").captioner.eval()
    perturb_trainable(captioner)
    with torch.no_grad():
        memory = captioner.encode(pixels_for(captioner, 2))
        cache = DecoderCache.build(captioner.decoder, memory)
        layer = cache.layers[0]
        # prefix keys/values (10) and the 101 image tokens, one row per image; no text yet
        assert layer.shared_k.shape[:3] == (2, 4, 10 + 101) and layer.self_k is None and cache.length == 0
        shared = layer.shared_k
        model = next_token_model(captioner.decoder, memory)
        model.cache = cache
        model.expand(3)
        model.logits(torch.full((6, 1), 50256))
        assert layer.shared_k is shared and layer.self_k.shape[:3] == (6, 4, 1)  # never copied per beam


@pytest.mark.parametrize("options", [{"position_embeddings": False}, {"grid": 3, "projector": "linear"}])
def test_cached_decoding_equals_recompute_for_the_visual_tokens_options(registry, options):
    captioner, tokenizer = build(registry, options=options).captioner.eval(), Tokenizer()
    perturb_trainable(captioner)
    with torch.no_grad():
        captioner.decoder.wte.weight[tokenizer.eot_id] *= 2.2
    pixels, beam = pixels_for(captioner, 3), registry.get("decoding", "beam")
    for strategy, opts in ((registry.get("decoding", "greedy"), {}), (beam, {"num_beams": 3})):
        assert generate_tokens(captioner, pixels, tokenizer, strategy, opts, 8, cached=True) == \
            generate_tokens(captioner, pixels, tokenizer, strategy, opts, 8, cached=False)


def test_token_reduction_keeps_cls_and_pools_the_grid(registry):
    captioner = build(registry, options={"grid": 2}).captioner
    assert captioner.image_tokens.count == 1 + 4 and captioner.image_tokens.grid == (2, 2)
    features = torch.randn(1, 101, 64)
    reduced = captioner.projection.reduce(features)
    torch.testing.assert_close(reduced[:, 0], features[:, 0])  # the CLS token as it is
    grid = features[0, 1:].reshape(10, 10, 64)
    torch.testing.assert_close(reduced[0, 1], grid[:5, :5].mean((0, 1)))  # top-left quarter, averaged


def test_position_embeddings_option(registry):
    decoder = build(registry, options={"position_embeddings": False}).captioner.decoder
    memory = torch.randn(1, 101, 64)
    _, positions, first = decoder.prefill_inputs(memory, 1)
    assert (positions == -1).all() and first == 0  # the text keeps positions 0..
    decoder = build(registry).captioner.decoder
    _, positions, first = decoder.prefill_inputs(memory, 1)
    assert positions.tolist() == list(range(101)) and first == 101


def test_cross_attention_layers_option_and_peft_none(registry):
    built = build(registry, method="none", connector="cross-attention", options={"layers": [-1]})
    decoder = built.captioner.decoder
    assert decoder.h[0].cross_attn is None and decoder.h[1].cross_attn is not None
    counts = count_parameters(built.captioner).groups
    assert "peft" not in counts and counts["cross-attention"][0] == 33536 // 2
    with pytest.raises(VlcapError, match=r"connector.options.layers: layer\(s\) \[5\]"):
        build(registry, connector="cross-attention", options={"layers": [5]})


def test_lora_on_cross_attention_trains_only_the_low_rank_update(registry):
    built = build(registry, connector="cross-attention", peft_options={"targets": ["q", "v", "cross_q", "cross_v"]})
    attention = built.captioner.decoder.h[0].cross_attn
    assert not attention.q.weight.requires_grad and attention.q.lora_A.requires_grad
    assert attention.k.weight.requires_grad and attention.form == "project"  # v is wrapped: k/v run in training
    with pytest.raises(VlcapError, match="cross_q need cross-attention"):
        build(registry, peft_options={"targets": ["cross_q"]})


def test_adapter_after_cross_attention(registry):
    block = build(registry, method="adapter", connector="cross-attention",
                  peft_options={"placement": ["attn", "cross_attn"]}).captioner.decoder.h[0]
    assert type(block.post_cross_attn).__name__ == "Adapter" and type(block.post_mlp).__name__ == "Identity"
    with pytest.raises(VlcapError, match="cross_attn needs cross-attention"):
        build(registry, method="adapter", peft_options={"placement": "houlsby+cross"})


def test_sequence_too_long_is_one_line(tmp_path, small_synthetic):
    result = vlcap_cli("train", "--preset", "tiny", "--connector", "visual-tokens",
                       "--train-json", small_synthetic / "train.json", "--train-images", small_synthetic / "images_train",
                       "--set", "data.max_caption_tokens=200", "--out", tmp_path / "run")
    assert result.exit_code != 0 and len(result.output.strip().splitlines()) == 1, result.output
    assert "data.max_caption_tokens=200: 101 positions before the text" in result.output
    assert "at most 154" in result.output


def test_dry_run_visual_tokens_lora_r32_qkv_mlp_fits_the_budget_at_vit_l():
    result = vlcap_cli("train", "--dry-run", "--connector", "visual-tokens", "--peft", "lora",
                       "--encoder", "vit_large_patch14_clip_224.openai", "--set", "peft.options.r=32",
                       "--set", "peft.options.targets=[q,k,v,mlp]")
    assert result.exit_code == 0, result.output
    trainable = int(result.output.split("trainable: ")[1].split(" of")[0].replace(",", ""))
    assert trainable < 35_000_000 and "cross-attention" not in result.output.split("part")[1]


def test_visual_tokens_train_caption_inspect_and_old_checkpoints(tmp_path, small_synthetic, registry):
    run = tmp_path / "run"
    trained = vlcap_cli("train", "--preset", "tiny", "--connector", "visual-tokens", "--peft", "lora",
                        "--set", "connector.options.grid=4", "--set", "connector.options.dropout=0.1",
                        "--train-json", small_synthetic / "train.json", "--train-images", small_synthetic / "images_train",
                        "--max-steps", 2, "--batch-size", 8, "--set", "train.metrics=[]", "--out", run,
                        "--cache-features", "--set", "train.length_buckets=true")  # from the encoder's cached tokens
    assert trained.exit_code == 0, trained.output
    assert (run / "feature_cache" / "manifest.json").exists()
    checkpoint = run / "best.safetensors"
    inspected = vlcap_cli("inspect", checkpoint)
    assert "visual-tokens (vlcap" in inspected.output and '"grid": 4' in inspected.output
    captioned = vlcap_cli("caption", small_synthetic / "images_val", "--checkpoint", checkpoint,
                          "--out", tmp_path / "pred.json", "--max-length", 5)
    assert captioned.exit_code == 0, captioned.output
    assert len(json.loads((tmp_path / "pred.json").read_text())) == 4
    loaded = load_checkpoint(checkpoint, registry)
    assert loaded.config.connector.options["grid"] == 4 and loaded.captioner.decoder.image_prefix is not None
    drawn, = visualize(loaded, [Target(next((small_synthetic / "images_val").iterdir()), "map")], tmp_path, registry,
                       max_length=4, save_npz=True)
    saved = np.load(drawn.npz)
    assert tuple(saved["grid_size"]) == (4, 4) and saved["word_maps"].shape[1:] == (4, 4)
    np.testing.assert_allclose(saved["token_weights"].sum(-1), 1, rtol=1e-5)
    assert ((saved["image_share"] > 0) & (saved["image_share"] <= 1 + 1e-6)).all()
    # a checkpoint needing a connector that is not installed names its package
    tensors, metadata = read(checkpoint)
    config = json.loads(metadata["config"])
    config["connector"]["name"] = "resampler"
    metadata.update(config=json.dumps(config), connector=json.dumps(
        {"name": "resampler", "package": "vlcap-resampler", "version": "2.0"}))
    save_file(tensors, tmp_path / "other.safetensors", metadata)
    with pytest.raises(VlcapError, match="needs connector 'resampler' from package 'vlcap-resampler'.*install that package"):
        load_checkpoint(tmp_path / "other.safetensors", registry)


def read(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())


def test_a_checkpoint_from_before_connectors_loads_as_cross_attention(tmp_path, run_dir, registry):
    tensors, metadata = read(run_dir / "best.safetensors")
    config = json.loads(metadata.pop("connector") and metadata["config"])
    del config["connector"]
    metadata["config"] = json.dumps(config)
    save_file(tensors, tmp_path / "old.safetensors", metadata)
    loaded = load_checkpoint(tmp_path / "old.safetensors", registry)
    assert loaded.config.connector.name == "cross-attention" and loaded.captioner.decoder.h[1].cross_attn is not None
    assert "not recorded" in vlcap_cli("inspect", tmp_path / "old.safetensors").output


PLUGIN = '''
import torch
from torch import nn

import vlcap
from vlcap.api import Connector, ImagePrefix, ImageTokens


class MeanToken(nn.Module):
    def __init__(self, width, out):
        super().__init__()
        self.proj = nn.Linear(width, out)

    def forward(self, tokens):
        return self.proj(tokens.mean(1, keepdim=True))


class OneToken(Connector):
    name = "one-token"
    description = "The mean encoder token, projected, as one input token (test connector)"

    def apply(self, captioner, config):
        captioner.projection = MeanToken(captioner.encoder.embed_dim, captioner.decoder.cfg.n_embd)
        captioner.image_tokens = ImageTokens(1, (0, 0))
        captioner.decoder.image_prefix = ImagePrefix(position_embeddings=False)


@vlcap.hookimpl
def register_connectors(register):
    register(OneToken())
'''


def test_hook_register_connectors(tmp_path, site, small_synthetic):
    """A connector defined only here, through the hook (no core change), trains and captions."""
    install_package(site, "vlcap-one-token", "vlcap_one_token", PLUGIN)
    registry = load_registry()
    assert registry.entry("connector", "one-token").package == "vlcap-one-token"
    from vlcap.core.train.trainer import train
    cfg = tiny_config("adapter", connector={"name": "one-token"}, **data_overrides(small_synthetic),
                      train={"max_steps": 2, "batch_size": 8, "metrics": []})
    result = train(cfg, tmp_path / "run", registry)
    loaded = load_checkpoint(result.best_checkpoint, registry)
    assert json.loads(read(result.best_checkpoint)[1]["connector"])["package"] == "vlcap-one-token"
    assert loaded.captioner.image_tokens.count == 1
    from vlcap.core.infer.captioning import caption_paths
    paths = sorted((small_synthetic / "images_val").iterdir())
    captions = caption_paths(loaded, paths, registry, strategy="beam", options={"num_beams": 2}, max_length=5)
    assert len(captions.predictions) == len(paths)
    with torch.no_grad():
        pixels = torch.stack([loaded.captioner.encoder.transform()(Image.open(p).convert("RGB")) for p in paths])
    beam = registry.get("decoding", "beam")
    assert generate_tokens(loaded.captioner, pixels, loaded.tokenizer, beam, {"num_beams": 2}, 5) == \
        generate_tokens(loaded.captioner, pixels, loaded.tokenizer, beam, {"num_beams": 2}, 5, cached=False)


@needs_shared
def test_visual_tokens_on_real_photos_train_caption_evaluate_visualize(tmp_path):
    """The README's commands with --connector visual-tokens on real photos (the tiny preset)."""
    data, out = SHARED / "data/flickr8k_1k", tmp_path / "run"
    trained = vlcap_cli("train", "--preset", "tiny", "--connector", "visual-tokens", "--peft", "lora",
                        "--train-json", data / "train.json", "--train-images", data / "images_train",
                        "--max-steps", 2, "--batch-size", 8, "--set", "train.metrics=[]", "--out", out)
    assert trained.exit_code == 0, trained.output
    pred = tmp_path / "pred.json"
    captioned = vlcap_cli("caption", data / "images_val", "--checkpoint", out / "best.safetensors", "--out", pred,
                          "--max-length", 5, "--num-beams", 2)
    assert captioned.exit_code == 0, captioned.output
    evaluated = vlcap_cli("evaluate", "--pred", pred, "--annotations", data / "val.json", "--no-clipscore", "--json")
    assert evaluated.exit_code == 0, evaluated.output
    drawn = vlcap_cli("visualize", SHARED / "data/hw3_p3_images", "--checkpoint", out / "best.safetensors",
                      "--out-dir", tmp_path / "maps", "--max-length", 4, "--save-npz")
    assert drawn.exit_code == 0, drawn.output
    assert len(list((tmp_path / "maps").glob("*.png"))) == len(list((SHARED / "data/hw3_p3_images").iterdir()))


def test_init_from_a_checkpoint_of_the_other_connector_is_one_line(run_dir, registry):
    from vlcap.core.model.checkpoint import init_trainable
    built = build(registry)
    with pytest.raises(VlcapError, match="trained with connector 'cross-attention'.*pass --connector cross-attention"):
        init_trainable(run_dir / "best.safetensors", built.captioner, built.config, Tokenizer(), registry)
