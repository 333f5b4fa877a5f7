"""Cross-attention maps (core/model/attention.py) and `vlcap visualize` as a user runs them."""
import json
import re

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from conftest import SHARED, needs_shared, tiny_config, vlcap_cli
from vlcap.core.model.attention import group_words, token_attention, word_attention
from vlcap.core.model.captioner import build_captioner
from vlcap.core.model.checkpoint import LoadedCaptioner
from vlcap.core.model.connector import ImageTokens
from vlcap.core.model.gpt2 import AttentionProbe
from vlcap.core.eval.clip import load_clip
from vlcap.core.data import load_captions
from vlcap.core.eval.evaluation import clip_scores, image_paths_for
from vlcap.core.model.tokenizer import Tokenizer
from vlcap.apps.visualize import Target, visualize

LINE = re.compile(r'^(\S+\.png): (\d+) panels?, "(.*)"')


def run_visualize(*args):
    return vlcap_cli("visualize", *args, width=250)


def tiny_captioner(registry, **encoder_kwargs):
    """A tiny random captioner; ``encoder_kwargs`` rebuild its test_vit (e.g. with register tokens)."""
    cfg = tiny_config("lora")
    captioner, method, _ = build_captioner(cfg, registry)
    if encoder_kwargs:
        encoder = captioner.encoder
        encoder.vit = timm.create_model("test_vit", pretrained=False, num_classes=0, **encoder_kwargs)
        encoder.num_prefix_tokens = encoder.vit.num_prefix_tokens
        captioner.image_tokens = ImageTokens.of(encoder)  # the token-wise projection keeps them all
    return LoadedCaptioner(captioner.eval(), Tokenizer(), cfg, method, {})


def test_recorded_weights_are_sdpa_s_and_the_ones_each_token_saw_while_decoding(registry, synthetic):
    loaded = tiny_captioner(registry)
    captioner, eot = loaded.captioner, loaded.tokenizer.eot_id
    torch.manual_seed(0)
    for block in captioner.decoder.h:  # a fresh captioner's cross-attention adds nothing: make it count
        torch.nn.init.normal_(block.cross_attn.c_proj.weight, std=0.5)
    pixels = captioner.encoder.transform()(Image.open(next((synthetic / "images_val").iterdir())).convert("RGB"))
    with torch.no_grad():
        memory = captioner.encode(pixels[None])
        ids = torch.tensor([[eot]])
        probe = AttentionProbe([1])
        for _ in range(5):  # greedy, end token banned, the whole sequence through the decoder each step
            logits = captioner.decoder(ids, memory, probe=probe)[:, -1]
            logits[:, eot] = -float("inf")
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
        plain = captioner.decoder(ids, memory)
        recorded = captioner.decoder(ids, memory, probe=AttentionProbe([1]))
    record = probe.weights[1]
    torch.testing.assert_close(recorded, plain, atol=1e-5, rtol=1e-5)
    tokens = ids[0, 1:].tolist()
    for head in (None, 2):
        weights, share = token_attention(captioner, pixels, tokens, eot, layer=1, head=head)
        assert share is None  # cross-attention attends to nothing but the image
        assert weights.shape == (5, captioner.encoder.num_tokens)
        seen = torch.stack([(w[0].mean(0) if head is None else w[0, head])[-1] for w in record])
        torch.testing.assert_close(weights, seen, atol=1e-5, rtol=1e-5)  # token k was predicted at position k-1
        torch.testing.assert_close(weights.sum(-1), torch.ones(5))


@pytest.mark.parametrize("text", ["A man  rides a bicycle, happily.", "café crème on a table", "skiing"])
def test_word_pieces_merge_into_the_caption_s_words(text):
    tokenizer = Tokenizer()
    tokens = tokenizer.encode(text)
    words = group_words(tokenizer, tokens)
    assert [w.text for w in words] == text.split()
    assert sorted(i for w in words for i in w.pieces) == list(range(len(tokens)))
    assert len(group_words(tokenizer, tokens, pieces=True)) == len(tokens)
    weights = torch.softmax(torch.randn(len(tokens), 7), -1)
    merged = word_attention(weights, words)
    torch.testing.assert_close(merged[0], weights[words[0].pieces].mean(0))
    torch.testing.assert_close(merged.sum(-1), torch.ones(len(words)))


@pytest.mark.parametrize("encoder_kwargs, prefix", [({}, 1), ({"reg_tokens": 2}, 3),
                                                    ({"class_token": False, "global_pool": "avg"}, 0)])
def test_a_planted_attention_pattern_peaks_at_its_patch(tmp_path, registry, synthetic, encoder_kwargs, prefix):
    loaded = tiny_captioner(registry, **encoder_kwargs)
    captioner = loaded.captioner
    assert captioner.encoder.num_prefix_tokens == prefix and captioner.encoder.grid_size == (10, 10)
    row, col = 7, 2
    patch = row * 10 + col
    # Layer 0's queries all point along `direction`, its keys are the image tokens themselves, and
    # the token of patch (7, 2) gets a large component along `direction`: every query looks there.
    n_embd = captioner.decoder.cfg.n_embd
    direction = torch.ones(n_embd) / n_embd ** 0.5
    attention = captioner.decoder.h[0].cross_attn
    with torch.no_grad():
        attention.q.weight.zero_()
        attention.q.bias.copy_(5 * torch.ones(n_embd))
        attention.k.weight.copy_(torch.eye(n_embd))
        attention.k.bias.zero_()

    def plant(module, inputs, output):
        output = output.clone()
        output[:, prefix + patch] += 50 * direction
        return output

    captioner.projection.register_forward_hook(plant)
    image = next((synthetic / "images_val").iterdir())
    drawn, = visualize(loaded, [Target(image, "planted")], tmp_path, registry, strategy="beam",
                       options={"num_beams": 2, "min_length": 3, "max_length": 4}, layer=-2, save_npz=True)
    saved = np.load(drawn.npz)
    assert int(saved["layer"]) == 0 and int(saved["num_prefix_tokens"]) == prefix
    assert tuple(saved["grid_size"]) == (10, 10) and len(saved["token_ids"]) >= 3
    assert saved["token_weights"].shape == (len(saved["token_ids"]), prefix + 100)
    for maps in (saved["token_maps"], saved["word_maps"]):
        assert len(maps) >= 1
        for heat in maps:
            assert np.unravel_index(heat.argmax(), heat.shape) == (row, col)
            assert heat[row, col] > 0.9
    assert drawn.panels == len(saved["words"]) + 1


@needs_shared
def test_one_png_per_real_photo_with_a_panel_per_word_and_the_start_image(tmp_path, run_dir):
    photos = SHARED / "data/hw3_p3_images"
    out = tmp_path / "attention"
    result = run_visualize(photos, "--checkpoint", run_dir / "best.safetensors", "--out-dir", out,
                           "--decoding", "beam", "--set", "min_length=3", "--set", "max_length=6", "--save-npz")
    assert result.exit_code == 0, result.output
    drawn = [LINE.match(line) for line in result.output.splitlines() if LINE.match(line)]
    assert sorted(p.name for p in out.glob("*.png")) == sorted(f"{p.stem}.png" for p in photos.iterdir())
    assert len(drawn) == 5
    for match in drawn:
        png, panels, caption = match.group(1), int(match.group(2)), match.group(3)
        words = np.load(png[:-4] + ".npz")["words"]
        assert panels == len(words) + 1 == len(caption.split()) + 1 >= 2
        with Image.open(png) as image:
            assert image.format == "PNG" and image.width > 400


def test_rank_by_clipscore_draws_the_best_and_worst_scored_captions(tmp_path, run_dir, synthetic, tiny_clip):
    val = synthetic / "val.json"
    caption_set = load_captions(val)
    phrases = ["a red circle", "two blue squares on grey", "a dog", "green", "a small yellow triangle", "text"]
    predictions = {stem: phrases[i % len(phrases)] for i, stem in enumerate(sorted(
        p.stem for p in (synthetic / "images_val").iterdir()))}
    pred = tmp_path / "pred.json"
    pred.write_text(json.dumps(predictions))
    scores = clip_scores(predictions, image_paths_for(caption_set, synthetic / "images_val"), load_clip(str(tiny_clip)),
                         show_progress=False).per_image
    out = tmp_path / "ranked"
    result = run_visualize("--rank-by", "clipscore", "--pred", pred, "--annotations", val,
                           "--images", synthetic / "images_val", "--clip-model", tiny_clip, "--top", 1, "--bottom", 1,
                           "--checkpoint", run_dir / "best.safetensors", "--out-dir", out, "--save-npz")
    assert result.exit_code == 0, result.output
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert len(pngs) == 2 and pngs[0].startswith("best-1_") and pngs[1].startswith("worst-1_")
    best, worst = (name.split("_", 1)[1][:-4] for name in pngs)
    assert scores[best] == max(scores.values()) and scores[worst] == min(scores.values())
    for kind, stem in (("best", best), ("worst", worst)):
        assert f"{kind} 1 by CLIPScore: {scores[stem]:.4f}" in result.output
        assert str(np.load(out / f"{kind}-1_{stem}.npz")["caption"]) == predictions[stem]  # the scored caption


@pytest.mark.parametrize("args, message", [
    (["missing.jpg"], "missing.jpg: image not found"),
    (["broken.jpg"], "broken.jpg: unreadable image"),
    (["good.png", "--layer", "2"], "--layer: the decoder has 2 layers, so give -2..1"),
    (["good.png", "--head", "x"], "--head: give 'mean' or a head index"),
    (["good.png", "--head", "4"], "--head: the decoder has 4 heads per layer"),
    (["good.png", "--decoding", "beam", "--set", "beams=2"], "unknown key decoding.options.beams; did you mean num_beams?"),
    ([], "no images"),
    (["--rank-by", "clipscore", "--pred", "pred.json"], "needs --pred pred.json, --annotations val.json and --images"),
    (["good.png", "--rank-by", "clipscore"], "drop the IMAGES arguments"),
    (["good.png", "--pred", "pred.json"], "pass --rank-by clipscore"),
])
def test_bad_input_fails_in_one_line_and_draws_nothing(tmp_path, monkeypatch, run_dir, synthetic, args, message):
    monkeypatch.chdir(tmp_path)
    Image.open(next((synthetic / "images_val").iterdir())).save("good.png")
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "out"
    result = run_visualize(*args, "--checkpoint", run_dir / "best.safetensors", "--out-dir", out)
    assert result.exit_code != 0 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not out.exists() or not any(out.iterdir())
