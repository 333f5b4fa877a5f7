"""The package's own tests: vlcap's conformance kit for both plugins, then what is specific to them."""
import pytest

pytest.importorskip("vlcap_prompt_tuning", reason="pip install ./examples/vlcap-prompt-tuning to test it")

import torch  # noqa: E402

from vlcap.api import (DECODING_CHECKS, METRIC_CHECKS, PEFT_CHECKS, Tokenizer, VlcapError,  # noqa: E402
                       check_decoding_strategy, check_metric, check_peft_method, make_synthetic_set, tiny_captioner)
from vlcap_prompt_tuning.typical import typical  # noqa: E402


@pytest.mark.parametrize("check", PEFT_CHECKS)
def test_prompt_passes_the_kit(check):
    check_peft_method("prompt", check)


@pytest.mark.parametrize("check", DECODING_CHECKS)
def test_typical_passes_the_kit(check):
    check_decoding_strategy("typical", check)


@pytest.mark.parametrize("check", METRIC_CHECKS)
def test_distinct_passes_the_kit(check):
    check_metric("distinct", check)


def test_distinct_n_per_caption_and_pooled():
    from vlcap_prompt_tuning.distinct import DistinctConfig, DistinctN
    result = DistinctN().score({"a": "a dog and a dog", "b": "two cats"}, {}, {}, DistinctConfig(n=2))
    # a: (a dog) (dog and) (and a) (a dog) -> 3 of 4; b: one bigram; pooled 4 distinct of 5
    assert result.per_image == {"a": 0.75, "b": 1.0} and result.score == 0.8


def test_the_command_lists_the_text_init_tokens():
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "vlcap", "prompt-init", "a photo of", "--length", "5"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    ids = Tokenizer().encode("a photo of")
    assert [int(line.split("\t")[1]) for line in out.stdout.splitlines()] == (ids * 2)[:5]


def build(**options):
    return tiny_captioner("prompt", **options)[0]


def test_text_init_starts_from_the_texts_token_embeddings():
    captioner = build(length=5, init="text", text="a photo of")
    ids = Tokenizer().encode("a photo of")  # 3 tokens, repeated to fill 5
    expected = captioner.decoder.wte.weight[(ids * 2)[:5]]
    assert torch.equal(captioner.peft["prompt"].embedding, expected)
    assert captioner.peft["prompt"].embedding.requires_grad


def test_the_prompt_takes_the_first_positions_and_its_outputs_are_dropped():
    captioner = build(length=4).eval()
    ids = torch.randint(0, 50257, (2, 6), generator=torch.Generator().manual_seed(0))
    memory = torch.zeros(2, 5, captioner.decoder.cfg.n_embd)
    with torch.no_grad():
        logits = captioner.decoder(ids, memory)
        # the same computation by hand: prompt + tokens through the decoder, first 4 outputs dropped
        prompt = captioner.peft["prompt"](2)
        x = torch.cat([prompt, captioner.decoder.wte(ids)], 1)
        by_hand = captioner.decoder.lm_head(captioner.decoder.ln_f(captioner.decoder.transform(x, memory)))[:, 4:]
        captioner.decoder.input_prefix = None
        without = captioner.decoder(ids, memory)
    assert logits.shape == (2, 6, 50257)
    torch.testing.assert_close(logits, by_hand)
    assert not torch.allclose(logits, without)


@pytest.mark.parametrize("options, message", [({"length": 0}, "length"), ({"init": "zeros"}, "init"),
                                              ({"init": "text", "text": ""}, "text")])
def test_bad_options_are_one_line_errors(options, message):
    with pytest.raises(VlcapError, match=message):
        build(**options)


def test_typical_set_keeps_the_tokens_nearest_the_entropy():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    # entropy ~1.14 nats; surprisals 0.69, 1.20, 1.90, 3.00: nearest first 1, 0, 2, 3
    kept = typical(logits, 0.5).isfinite()[0].tolist()
    assert kept == [True, True, False, False]
    assert typical(logits, 1e-6).isfinite()[0].tolist() == [False, True, False, False]


def test_installed_package_is_listed_with_its_name_and_version():
    import json
    import subprocess
    from importlib.metadata import version
    out = subprocess.run(["vlcap", "list-plugins", "--json"], capture_output=True, text=True, check=True).stdout
    mine = {e["name"]: e for e in json.loads(out) if e["package"] == "vlcap-prompt-tuning"}
    assert set(mine) == {"prompt", "typical", "distinct", "prompt-init"}
    assert mine["prompt"]["kind"] == "peft" and mine["prompt"]["version"] == version("vlcap-prompt-tuning")


def test_vlcap_trains_with_prompt_and_captions_with_typical(tmp_path):
    import json
    import subprocess
    import sys
    data = make_synthetic_set(tmp_path / "data", train_images=4, val_images=2)
    out = tmp_path / "run"

    def vlcap(*args):  # the command line, as a user of the package runs it
        return subprocess.run([sys.executable, "-m", "vlcap", *map(str, args)], capture_output=True, text=True)

    trained = vlcap(
        "train", "--preset", "tiny", "--peft", "prompt", "--set", "peft.options.init=text",
        "--train-json", str(data / "train.json"), "--train-images", str(data / "images_train"),
        "--val-json", str(data / "val.json"), "--val-images", str(data / "images_val"),
        "--out", str(out), "--max-steps", "2", "--batch-size", "4", "--set", "train.metrics=[]")
    assert trained.returncode == 0, trained.stderr
    captioned = vlcap("caption", data / "images_val", "--checkpoint", out / "best.safetensors",
                      "--out", tmp_path / "pred.json", "--decoding", "typical", "--set", "seed=0", "--max-length", "5")
    assert captioned.returncode == 0, captioned.stderr
    assert len(json.loads((tmp_path / "pred.json").read_text())) == 2
