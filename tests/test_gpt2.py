"""The decoder loads the course's decoder_model.bin format and computes GPT-2 exactly.

Only the parity test against HF's GPT-2 needs ``transformers`` (the ``hf_gpt2`` fixture skips
without it); the loading and cross-attention maths tests run everywhere."""
import pytest
import torch
import torch.nn.functional as F

from vlcap.core.errors import VlcapError
from vlcap.core.model.course_weights import course_state_dict, load_course_weights, save_course_weights
from vlcap.core.model.gpt2 import (AttentionProbe, CrossAttention, GPT2Config, GPT2Decoder, add_cross_attention,
                                   attend_and_keep, merge_heads, split_heads)
from vlcap.core.model.kv_cache import DecoderCache


@pytest.fixture(scope="module")
def hf_gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=32, vocab_size=300, n_positions=64,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # random, non-trivial LayerNorm and bias values too
        for name, p in model.named_parameters():
            if "ln_" in name or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def ours(n_layer=2, n_head=4, n_embd=32, vocab_size=300, block_size=64):
    """A decoder with cross-attention in every layer (what the cross-attention connector adds)."""
    cfg = GPT2Config(n_layer, n_head, n_embd, vocab_size, block_size)
    decoder = GPT2Decoder(cfg)
    for block in decoder.h:
        add_cross_attention(block, cfg)
    return decoder.eval()


@pytest.fixture
def course_state():
    """A course-format state dict (what ``decoder_model.bin`` holds) of a random decoder."""
    torch.manual_seed(0)
    return course_state_dict(ours())


def course_file(tmp_path, state, name="decoder_model.bin"):
    # The course file is GPT-2's transformer state dict (HF Conv1D layout, no 'transformer.').
    path = tmp_path / name
    torch.save(state, path)
    return path


def test_logits_equal_transformers_gpt2(hf_gpt2, tmp_path):
    decoder = ours()
    load_course_weights(decoder, course_file(tmp_path, hf_gpt2.transformer.state_dict()))
    ids = torch.randint(0, 300, (3, 17))
    memory = torch.randn(3, 5, 32)  # cross-attention starts as a no-op (zero output projection)
    with torch.no_grad():
        expected = hf_gpt2(ids).logits
        actual = decoder(ids, memory)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_mask_buffers_are_accepted(course_state, tmp_path):
    state = dict(course_state)
    for i in range(2):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(64, 64)).view(1, 1, 64, 64)
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    load_course_weights(ours(), course_file(tmp_path, state))


def test_written_weights_reload_identically(tmp_path):
    torch.manual_seed(1)
    first, second = ours(), ours()
    save_course_weights(first, tmp_path / "decoder_model.bin")
    saved = torch.load(tmp_path / "decoder_model.bin", weights_only=True)
    assert saved["h.0.attn.c_attn.weight"].shape == (32, 96)  # Conv1D layout, as the course stores it
    assert not any("cross" in k or k.startswith("transformer.") for k in saved)
    load_course_weights(second, tmp_path / "decoder_model.bin")
    for (name, a), b in zip(course_state_dict(first).items(), course_state_dict(second).values()):
        assert torch.equal(a, b), name


def test_unexpected_and_missing_keys_are_reported(course_state, tmp_path):
    state = dict(course_state)
    state["h.0.attn.extra.weight"] = torch.zeros(1)
    del state["ln_f.bias"]
    path = course_file(tmp_path, state)
    with pytest.raises(VlcapError, match=r"decoder_model.bin.*missing ln_f.bias.*unexpected h.0.attn.extra.weight"):
        load_course_weights(ours(), path)


def test_prefixed_state_dict_is_refused_with_a_hint(course_state, tmp_path):
    # What GPT2LMHeadModel.state_dict() holds: the 'transformer.' prefix and the LM head.
    state = {f"transformer.{key}": value for key, value in course_state.items()}
    path = course_file(tmp_path, {**state, "lm_head.weight": course_state["wte.weight"]})
    with pytest.raises(VlcapError, match="without the 'transformer.' prefix"):
        load_course_weights(ours(), path)


def test_wrong_size_names_the_tensor(course_state, tmp_path):
    path = course_file(tmp_path, course_state)
    with pytest.raises(VlcapError, match=r"wpe.weight has shape \(64, 32\).*needs \(128, 32\)"):
        load_course_weights(ours(block_size=128), path)


def test_missing_or_garbage_file_is_a_clear_error(tmp_path):
    with pytest.raises(VlcapError, match="decoder weights not found"):
        load_course_weights(ours(), tmp_path / "nope.bin")
    (tmp_path / "junk.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(VlcapError, match="junk.bin: not a readable torch state dict"):
        load_course_weights(ours(), tmp_path / "junk.bin")


def random_cross_attention(n_embd=32, n_head=4):
    torch.manual_seed(0)
    attention = CrossAttention(GPT2Config(n_head=n_head, n_embd=n_embd))
    with torch.no_grad():  # non-zero everywhere: biases and the (zero-initialised) output projection too
        for p in attention.parameters():
            p.normal_(std=0.3)
    return attention


def output_and_gradients(attention, attend, x, memory):
    for t in (x, memory, *attention.parameters()):
        t.grad = None
    q = split_heads(attention.q(x), attention.n_head)
    y = attention.c_proj(merge_heads(attend(q, memory)))
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return y.detach(), [t.grad.clone() for t in (x, memory, *attention.parameters())]


def test_attending_in_memory_space_equals_projecting_the_image_tokens():
    """Training's cross-attention never projects the image tokens (fewer multiply-adds), yet
    computes what SDPA on their keys/values computes: same output, same gradient for every
    parameter (the key bias included, which DDP needs to see used) and for the image tokens."""
    attention = random_cross_attention()
    x, memory = torch.randn(3, 6, 32, requires_grad=True), torch.randn(3, 50, 32, requires_grad=True)
    fast, fast_grads = output_and_gradients(attention, attention.attend_in_memory_space, x, memory)
    plain, plain_grads = output_and_gradients(
        attention, lambda q, m: F.scaled_dot_product_attention(q, *attention.memory_kv(m)), x, memory)
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
    for fast_grad, plain_grad in zip(fast_grads, plain_grads):
        torch.testing.assert_close(fast_grad, plain_grad, rtol=1e-4, atol=1e-5)


def image_token_projections(attention, T, N):
    """How many times ``forward`` ran the key projection over ``N`` image tokens for ``T`` text positions."""
    calls = []
    handle = attention.k.register_forward_hook(lambda *_: calls.append(1))
    attention(torch.randn(2, T, 32), torch.randn(2, N, 32))
    handle.remove()
    return len(calls)


def test_the_form_switch_decides_whether_the_image_tokens_are_projected():
    attention = random_cross_attention()
    assert attention.form == "auto"  # the default: the cheaper form
    assert image_token_projections(attention, T=4, N=50) == 0  # few caption tokens, many image tokens
    assert image_token_projections(attention, T=40, N=50) == 1  # text as long as the image: projecting is cheaper
    attention.form = "project"  # what a method that hooks or replaces k/v asks for
    assert image_token_projections(attention, T=4, N=50) == 1


def test_kept_weights_are_the_ones_sdpa_s_output_is_made_of():
    attention = random_cross_attention()
    q, memory = torch.randn(2, 4, 6, 8), torch.randn(2, 50, 32)
    k, v = attention.memory_kv(memory)
    keep = []
    y = attend_and_keep(q, k, v, keep)
    torch.testing.assert_close(y, F.scaled_dot_product_attention(q, k, v), rtol=1e-5, atol=1e-6)
    (weights,) = keep
    assert weights.shape == (2, 4, 6, 50)
    torch.testing.assert_close(weights @ v, y)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 6))


def test_a_probe_keeps_its_layers_weights_and_changes_nothing():
    decoder = ours()
    with torch.no_grad():
        for block in decoder.h:  # make the cross-attention count
            block.cross_attn.c_proj.weight.normal_(std=0.5)
    ids, memory = torch.randint(0, 300, (3, 7)), torch.randn(3, 20, 32)
    probe = AttentionProbe([1])
    with torch.no_grad():
        plain = decoder(ids, memory)
        probed = decoder(ids, memory, probe=probe)
        decoder(ids[:, :4], memory, probe=probe)
    torch.testing.assert_close(probed, plain, rtol=1e-5, atol=1e-5)
    assert list(probe.weights) == [1] and [w.shape for w in probe.weights[1]] == [(3, 4, 7, 20), (3, 4, 4, 20)]
    with pytest.raises(ValueError, match=r"probe layer\(s\) \[2\]"):
        decoder(ids, memory, probe=AttentionProbe([2]))
    with pytest.raises(ValueError, match="only cross, self"):
        AttentionProbe([0], kind="mlp")
    with pytest.raises(ValueError, match="not incremental decoding"):
        decoder(ids, cache=DecoderCache.build(decoder, memory), probe=AttentionProbe([0]))


def test_memory_space_attention_under_bf16_autocast():
    attention = random_cross_attention()
    x, memory = torch.randn(2, 5, 32), torch.randn(2, 50, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = attention(x, memory)
        plain = F.scaled_dot_product_attention(split_heads(attention.q(x), 4), *attention.memory_kv(memory))
        plain = attention.c_proj(merge_heads(plain))
    assert fast.dtype == plain.dtype == torch.bfloat16
    torch.testing.assert_close(fast.float(), plain.float(), rtol=0.05, atol=0.1)
