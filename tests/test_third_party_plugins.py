"""Plugins as an outside author writes them, through the hooks and ``vlcap.api`` only: a BitFit
method (pretrained parameters trained by declaration), a contrastive-search strategy (the
decoder's hidden states through ``NextToken``) and a BLEU-4 metric (per-image scores, options),
each installed as its own package next to vlcap."""
import csv
import json
import re
import warnings

import pytest
import torch
from safetensors.torch import load_file

from conftest import install_package, vlcap_cli

from vlcap.core import plugins as plugins_lib
from vlcap.core.errors import VlcapError
from vlcap.core.plugins import load_registry

BITFIT = '''
from dataclasses import dataclass

from torch import nn

import vlcap
from vlcap.api import PeftMethod, is_pretrained


@dataclass
class BitFitConfig:
    layernorm: bool = False  # also train the LayerNorm gains


class BitFit(PeftMethod):
    name = "bitfit"
    description = "BitFit: train the pretrained decoder's biases (and optionally LayerNorm gains)"
    config_class = BitFitConfig
    zero_init = True  # nothing is added: the output is the pretrained model's

    def apply(self, captioner, config):
        pass  # nothing to add: the trained tensors already exist

    def pretrained_to_train(self, captioner, config):
        chosen = []
        for module in captioner.decoder.modules():
            for name, p in module.named_parameters(recurse=False):
                if not is_pretrained(p):
                    continue
                if name == "bias" or (config.layernorm and isinstance(module, nn.LayerNorm)):
                    chosen.append(p)
        return chosen


class Sneaky(PeftMethod):
    name = "sneaky"
    description = "replaces a pretrained bias with a fresh Parameter (what the core refuses)"

    def apply(self, captioner, config):
        lin = captioner.decoder.h[0].mlp.c_fc
        lin.bias = nn.Parameter(lin.bias.detach().clone())


@vlcap.hookimpl
def register_peft_methods(register):
    register(BitFit())
    register(Sneaky())
'''

CONTRASTIVE = '''
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import vlcap
from vlcap.api import DecodingStrategy, VlcapError, cut_at_end


@dataclass
class ContrastiveConfig:
    top_k: int = 4
    alpha: float = 0.6  # weight of the degeneration penalty (0: greedy)


class ContrastiveSearch(DecodingStrategy):
    """Su et al. (2022): among the top_k tokens, the one maximising
    (1 - alpha) * p(token) - alpha * max cosine(its hidden state, the context's hidden states)."""
    name = "contrastive"
    description = "Contrastive search (top_k, alpha) on the decoder's final hidden states"
    config_class = ContrastiveConfig

    def generate(self, model, config, *, start_id, end_id, max_length):
        if config.top_k < 1 or not 0 <= config.alpha <= 1:
            raise VlcapError("decoding.options: top_k must be >= 1 and alpha in [0, 1]")
        images, k = model.images, config.top_k
        ids = torch.full((images, 1), start_id, dtype=torch.long, device=model.device)
        logits, state = model.logits(ids, hidden=True)
        context = state[:, None]  # (images, tokens so far, width)
        finished = torch.zeros(images, dtype=torch.bool, device=model.device)
        for _ in range(max_length):
            top_p, top_ids = logits.float().softmax(-1).topk(k, dim=-1)  # (images, k)
            model.expand(k)
            candidates = torch.cat([ids.repeat_interleave(k, 0), top_ids.reshape(-1, 1)], 1)
            next_logits, states = model.logits(candidates, hidden=True)  # each candidate's own state
            similarity = F.cosine_similarity(states.view(images, k, 1, -1).float(),
                                             context[:, None].float(), dim=-1).amax(-1)
            best = ((1 - config.alpha) * top_p - config.alpha * similarity).argmax(-1)
            rows = torch.arange(images, device=ids.device) * k + best
            model.reorder(rows)  # back to one row per image: the chosen candidate's
            chosen = top_ids.gather(1, best[:, None]).squeeze(1).masked_fill(finished, end_id)
            ids = torch.cat([ids, chosen[:, None]], 1)
            context = torch.cat([context, states[rows][:, None]], 1)
            logits = next_logits[rows]
            finished |= chosen == end_id
            if finished.all():
                break
        return [cut_at_end(row[1:].tolist(), end_id) for row in ids]


@vlcap.hookimpl
def register_decoding_strategies(register):
    register(ContrastiveSearch())
'''

BLEU = '''
import math
import re
from collections import Counter
from dataclasses import dataclass

import vlcap
from vlcap.api import Metric, MetricScores


@dataclass
class BleuConfig:
    max_n: int = 4
    smooth: bool = True  # add-one smoothing of the n > 1 precisions (Lin & Och), so one miss is not 0


def words(text):
    return re.findall(r"[a-z0-9]+", text.lower())


def ngrams(tokens, n):
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def statistics(caption, references, max_n):
    """(matches per n, totals per n, hypothesis length, closest reference length)."""
    hyp, refs = words(caption), [words(r) for r in references]
    matches, totals = [], []
    for n in range(1, max_n + 1):
        counts, most = ngrams(hyp, n), Counter()
        for ref in refs:
            most |= ngrams(ref, n)
        matches.append(sum(min(c, most[g]) for g, c in counts.items()))
        totals.append(max(len(hyp) - n + 1, 0))
    closest = min((abs(len(r) - len(hyp)), len(r)) for r in refs)[1]
    return matches, totals, len(hyp), closest


def bleu(stats, max_n, smooth):
    matches = [sum(s[0][n] for s in stats) for n in range(max_n)]
    totals = [sum(s[1][n] for s in stats) for n in range(max_n)]
    hyp, ref = sum(s[2] for s in stats), sum(s[3] for s in stats)
    if hyp == 0:
        return 0.0
    add = [1 if smooth and n > 0 else 0 for n in range(max_n)]
    if any(m + a == 0 for m, a in zip(matches, add)):
        return 0.0
    log_precision = sum(math.log((m + a) / (t + a)) for m, t, a in zip(matches, totals, add)) / max_n
    brevity = min(0.0, 1 - ref / hyp)
    return math.exp(log_precision + brevity)


class Bleu4(Metric):
    name = "bleu4"
    title = "BLEU-4"
    description = "BLEU (corpus; per image: sentence BLEU), max_n-grams, optional add-one smoothing"
    config_class = BleuConfig

    def score(self, predictions, references, image_paths, config):
        stats = {s: statistics(predictions[s], references[s], config.max_n) for s in predictions}
        per_image = {s: bleu([stats[s]], config.max_n, config.smooth) for s in predictions}
        return MetricScores(bleu([stats[s] for s in sorted(stats)], config.max_n, config.smooth), per_image)


@vlcap.hookimpl
def register_metrics(register):
    register(Bleu4())
'''


@pytest.fixture(scope="module")
def third_party(tmp_path_factory):
    """The three packages installed (for this module); the process-wide registry (what the CLI
    uses) reloaded with them, and again without them afterwards."""
    site = tmp_path_factory.mktemp("site")
    install_package(site, "vlcap-bitfit", "vlcap_bitfit", BITFIT)
    install_package(site, "vlcap-contrastive", "vlcap_contrastive", CONTRASTIVE)
    install_package(site, "vlcap-bleu", "vlcap_bleu", BLEU)
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(site))
        plugins_lib.registry.cache_clear()
        yield load_registry()
    plugins_lib.registry.cache_clear()


# --- BitFit: pretrained parameters trained by declaration -------------------------------------

@pytest.mark.parametrize("check", ["gradients", "pretrained_kept", "save_load", "budget", "zero_init"])
def test_bitfit_passes_the_kit(third_party, check):
    from vlcap.api import check_peft_method
    check_peft_method("bitfit", check, registry=third_party)


def test_bitfit_trains_saves_and_loads_only_the_declared_pretrained_tensors(tmp_path, synthetic, third_party):
    from vlcap.api import tiny_config
    from vlcap.core.model.checkpoint import load_checkpoint
    from vlcap.core.train.trainer import train
    data = {"train_json": str(synthetic / "train.json"), "train_images": str(synthetic / "images_train")}
    cfg = tiny_config("bitfit", data=data, peft={"method": "bitfit", "options": {"layernorm": True}},
                      train={"max_steps": 2, "batch_size": 8, "metrics": []})
    result = train(cfg, tmp_path / "run", third_party)
    saved = set(load_file(result.last_checkpoint))
    biases = {f"decoder.h.{i}.{m}.bias" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert biases <= saved and "decoder.ln_f.weight" in saved and "decoder.h.0.ln_1.weight" in saved
    assert not any(k.endswith("c_attn.weight") or k.startswith("encoder.") or "wte" in k for k in saved)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the decoder fingerprint still matches: no warning
        loaded = load_checkpoint(result.last_checkpoint, third_party)
    trained = dict(loaded.captioner.named_parameters())
    for name, tensor in load_file(result.last_checkpoint).items():
        assert torch.equal(trained[name].detach(), tensor), name  # loaded over the decoder weights' values
    inspected = vlcap_cli("inspect", result.last_checkpoint, "--json")
    meta = json.loads(inspected.stdout)
    assert set(meta["trained_pretrained"]) == saved - {k for k in saved if ".cross_attn." in k or ".ln_cross." in k
                                                       or k.startswith("projection.")}
    table = vlcap_cli("inspect", result.last_checkpoint)
    assert "trained pretrained" in table.stdout and "decoder:" in table.stdout


def test_replacing_a_pretrained_parameter_is_refused_by_the_core_and_the_kit(third_party):
    from vlcap.api import check_peft_method, tiny_captioner
    with pytest.raises(VlcapError, match=r"'sneaky' replaced or removed the pretrained parameter "
                                         r"decoder.h.0.mlp.c_fc.bias; keep the pretrained Parameter objects"):
        tiny_captioner("sneaky", registry=third_party)
    with pytest.raises(pytest.fail.Exception, match="replaced or removed"):
        check_peft_method("sneaky", "pretrained_kept", registry=third_party)


def test_declaring_what_is_not_a_pretrained_decoder_parameter_is_one_line(third_party):
    from vlcap.api import tiny_captioner
    bitfit = third_party.get("peft", "bitfit")
    original = type(bitfit).pretrained_to_train
    try:
        type(bitfit).pretrained_to_train = lambda self, captioner, config: [captioner.encoder.vit.cls_token]
        with pytest.raises(VlcapError, match=r"names encoder.vit.cls_token, the frozen encoder's"):
            tiny_captioner("bitfit", registry=third_party)
        type(bitfit).pretrained_to_train = lambda self, captioner, config: [captioner.projection.weight]
        with pytest.raises(VlcapError, match=r"names projection.weight, not a pretrained parameter"):
            tiny_captioner("bitfit", registry=third_party)
        type(bitfit).pretrained_to_train = lambda self, captioner, config: [torch.nn.Parameter(torch.zeros(2))]
        with pytest.raises(VlcapError, match="not a Parameter of the captioner"):
            tiny_captioner("bitfit", registry=third_party)
    finally:
        type(bitfit).pretrained_to_train = original


# --- contrastive search: hidden states through NextToken ------------------------------------

@pytest.mark.parametrize("check", ["valid_output", "cached_equals_recompute", "documented_interface"])
def test_contrastive_search_passes_the_kit(third_party, check):
    from vlcap.api import check_decoding_strategy
    check_decoding_strategy("contrastive", check, registry=third_party, options={"top_k": 3})


def test_contrastive_search_with_alpha_0_is_greedy_and_alpha_changes_captions(third_party):
    from vlcap.api import generate_tokens, perturb_trainable, pixels_for, tiny_captioner
    captioner, tokenizer = tiny_captioner("lora", registry=third_party)
    perturb_trainable(captioner)
    pixels = pixels_for(captioner, 2)

    def decode(name, **options):
        return generate_tokens(captioner, pixels, tokenizer, third_party.get("decoding", name), options, max_length=6)
    greedy = decode("greedy")
    assert decode("contrastive", alpha=0.0) == greedy
    assert decode("contrastive", alpha=0.9, top_k=4) != greedy


def test_next_token_hidden_state_is_the_final_hidden_state_of_the_last_position(third_party):
    from vlcap.api import perturb_trainable, pixels_for, tiny_captioner, token_ids
    from vlcap.core.infer.decoding import next_token_model
    captioner, _ = tiny_captioner("prefix", registry=third_party)
    perturb_trainable(captioner).eval()
    decoder = captioner.decoder
    ids = token_ids(2, 5, decoder.cfg.vocab_size)
    with torch.no_grad():
        memory = captioner.encode(pixels_for(captioner, 2))
        by_hand = decoder.ln_f(decoder.transform(decoder.wte(ids), memory))[:, -1]
        for cached in (True, False):
            model = next_token_model(decoder, memory, cached)
            logits, states = model.logits(ids, hidden=True)
            torch.testing.assert_close(states, by_hand, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(logits, decoder.lm_head(by_hand), rtol=1e-4, atol=1e-3)
            assert isinstance(next_token_model(decoder, memory, cached).logits(ids), torch.Tensor)  # not asked: logits


# --- BLEU-4: a metric with per-image scores and options ---------------------------------------

@pytest.mark.parametrize("check", ["perfect_caption", "order_independence", "per_image_consistency"])
def test_bleu4_passes_the_kit(third_party, check):
    from vlcap.api import check_metric
    check_metric("bleu4", check, registry=third_party)


def write_eval_set(tmp_path):
    references = {"img0": ["a red bus on the street", "a red bus parked on a street"],
                  "img1": ["two dogs on a beach", "dogs running on the sand"]}
    images = [{"id": i, "file_name": f"{stem}.png"} for i, stem in enumerate(references)]
    annotations = [{"id": 10 * i + j, "image_id": i, "caption": c}
                   for i, refs in enumerate(references.values()) for j, c in enumerate(refs)]
    (tmp_path / "val.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    (tmp_path / "pred.json").write_text(json.dumps({"img0": "a red bus on the street", "img1": "a cat on a sofa"}))
    return tmp_path / "pred.json", tmp_path / "val.json"


def test_evaluate_scores_with_a_plugin_metric_its_options_and_per_image_rows(tmp_path, third_party):
    pred, val = write_eval_set(tmp_path)
    per_image = tmp_path / "scores.csv"
    result = vlcap_cli("evaluate", "--pred", pred, "--annotations", val, "--metric", "bleu4", "--metric", "cider",
                       "--per-image", per_image, "--json")
    assert result.exit_code == 0, result.output
    scores = json.loads(result.stdout)
    assert set(scores["metrics"]) == {"bleu4", "cider"} and 0 < scores["bleu4"] < 1
    rows = list(csv.DictReader(per_image.open()))
    assert list(rows[0]) == ["stem", "caption", "bleu4", "cider"]  # ranked by the first metric asked for
    assert rows[0]["stem"] == "img0" and float(rows[0]["bleu4"]) == pytest.approx(1.0)
    unigrams = json.loads(vlcap_cli("evaluate", "--pred", pred, "--annotations", val, "--metric", "bleu4",
                                    "--set", "bleu4.max_n=1", "--json").stdout)
    assert unigrams["bleu4"] > scores["bleu4"]  # "a" and "on" match img1's references as unigrams
    table = vlcap_cli("evaluate", "--pred", pred, "--annotations", val, "--metric", "bleu4")
    assert "BLEU-4" in table.stdout and "top 5 by BLEU-4" in table.stdout


@pytest.mark.parametrize("args, message", [
    (["--metric", "bleu4", "--set", "bleu4.max_m=2"], r"bleu4.*max_m"),
    (["--metric", "bleu4", "--set", "cider.x=1"], r"options given for metric\(s\) cider, which are not scored"),
    (["--metric", "nope"], r"unknown metric 'nope'; installed: .*bleu4"),
    (["--metric", "bleu4", "--metric", "bleu4"], r"--metric bleu4 given twice"),
    (["--metric", "bleu4", "--rank-by", "cider"], r"--rank-by cider: not scored here"),
])
def test_bad_metric_requests_are_one_line(tmp_path, third_party, args, message):
    pred, val = write_eval_set(tmp_path)
    result = vlcap_cli("evaluate", "--pred", pred, "--annotations", val, *args)
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert re.search(message, lines[0]), lines[0]
