"""The HF peer of the benchmarks (benchmarks/hf_peer.py) computes what vlcap computes: the
decoding benchmark's HF ``generate`` rows and the training benchmark's HF LoRA stack are only
comparisons if they run the same model."""
import sys
from pathlib import Path

import pytest
import torch

from test_decoding import make_captioner
from vlcap.core.infer.decoding import generate_tokens

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from hf_peer import decoding_peer, hf_captioner, hf_generate, split_qkv  # noqa: E402


@pytest.fixture(scope="module")
def tiny(registry):
    captioner, method, tokenizer = make_captioner("lora", registry)  # LoRA non-zero, captions of varying length
    pixels = torch.randn(8, 3, 160, 160, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        memory = captioner.encode(pixels)
    return captioner, method, tokenizer, pixels, memory


@pytest.mark.parametrize("num_beams", [1, 3])
def test_hf_generate_on_the_copied_weights_gives_vlcaps_tokens(registry, tiny, num_beams):
    captioner, method, tokenizer, pixels, memory = tiny
    hf = decoding_peer(captioner, method, tokenizer.eot_id)
    strategy, options = ("greedy", {}) if num_beams == 1 else ("beam", {"num_beams": num_beams})
    ours = generate_tokens(captioner, pixels, tokenizer, registry.get("decoding", strategy), options, 10)
    theirs = hf_generate(hf, memory, start_id=tokenizer.eot_id, end_id=tokenizer.eot_id, max_length=10,
                         num_beams=num_beams)
    assert theirs == ours
    if num_beams == 1:  # a caption ended early: the end token is handled alike
        assert len({len(tokens) for tokens in ours}) > 1


def test_split_qkv_computes_what_the_fused_layer_does(tiny):
    captioner, _, tokenizer, _, memory = tiny
    model = hf_captioner(captioner.encoder, captioner.decoder.cfg, tokenizer.eot_id).eval()
    ids = torch.randint(0, 50257, (2, 7), generator=torch.Generator().manual_seed(0))
    from transformers.modeling_outputs import BaseModelOutput
    tokens = BaseModelOutput(last_hidden_state=torch.randn(2, 5, model.config.encoder.hidden_size))
    with torch.no_grad():
        fused = model(encoder_outputs=tokens, decoder_input_ids=ids).logits
        split = split_qkv(model)(encoder_outputs=tokens, decoder_input_ids=ids).logits
    torch.testing.assert_close(split, fused)
