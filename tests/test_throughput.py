"""Throughput options change speed or memory, not what is learned."""
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import tiny_config
from vlcap.core.model.captioner import build_captioner
from vlcap.core.model.tokenizer import IGNORE_INDEX
from vlcap.core.runtime import autocast_dtype
from vlcap.core.train.trainer import configure_decoder, train, validation_loss


@pytest.fixture
def captioner_and_batch(registry):
    captioner = build_captioner(tiny_config("adapter", peft={"options": {"layers": "all"}}), registry).captioner
    torch.manual_seed(0)
    ids = torch.randint(0, 50257, (2, 9))
    return captioner.train(), (torch.randn(2, 3, 160, 160), ids, ids.roll(-1, 1))


def gradients(captioner, batch):
    captioner.zero_grad()
    captioner.loss(*batch).backward()
    return {n: p.grad.clone() for n, p in captioner.named_parameters() if p.requires_grad}


def test_lm_head_only_at_labels_is_the_full_cross_entropy(captioner_and_batch):
    """The loss skips the LM head at unlabelled positions (padding, each caption's last input) and
    runs no position after the batch's last label: same value and gradients as cross-entropy over
    every position's logits with ignore_index."""
    captioner, (pixels, ids, labels) = captioner_and_batch
    labels = labels.clone()
    labels[0, 5:] = IGNORE_INDEX  # a short caption, padded
    labels[:, -1] = IGNORE_INDEX
    positions = []
    handle = captioner.decoder.wte.register_forward_hook(lambda module, args, out: positions.append(out.size(1)))
    fast = gradients(captioner, (pixels, ids, labels))
    handle.remove()
    assert positions == [ids.size(1) - 1]  # the unlabelled last position is never run
    fast_loss = captioner.loss(pixels, ids, labels)
    captioner.zero_grad()
    logits = captioner(pixels, ids)
    full_loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
    full_loss.backward()
    torch.testing.assert_close(fast_loss, full_loss)
    for name, p in captioner.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(fast[name], p.grad, rtol=1e-5, atol=1e-7)


def test_validation_loss_runs_without_autograd(captioner_and_batch, monkeypatch):
    captioner, (pixels, ids, labels) = captioner_and_batch
    grad_enabled, loss = [], captioner.loss

    def recording_loss(*batch):
        grad_enabled.append(torch.is_grad_enabled())
        return loss(*batch)
    monkeypatch.setattr(captioner, "loss", recording_loss)
    value = validation_loss(captioner, [(pixels, ids, labels, ())], torch.device("cpu"), None, set())
    assert grad_enabled == [False] and value == pytest.approx(float(loss(pixels, ids, labels)))


def test_gradient_checkpointing_gives_the_same_gradients(captioner_and_batch):
    captioner, batch = captioner_and_batch
    plain = gradients(captioner, batch)
    configure_decoder(captioner, tiny_config(train={"grad_checkpointing": True}))
    assert captioner.decoder.gradient_checkpointing
    checkpointed = gradients(captioner, batch)
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-7)


def test_compiled_decoder_gives_the_same_loss_and_parameter_names(captioner_and_batch):
    captioner, batch = captioner_and_batch
    names, loss = [n for n, _ in captioner.named_parameters()], captioner.loss(*batch)
    configure_decoder(captioner, tiny_config(train={"compile": "eager"}))  # dynamo tracing, no C++ build
    assert [n for n, _ in captioner.named_parameters()] == names  # checkpoints keep their keys
    torch._dynamo.utils.counters.clear()
    torch.testing.assert_close(captioner.loss(*batch), loss)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # the loss ran the compiled decoder


def test_bf16_autocast_on_cpu_only_when_asked(captioner_and_batch):
    cpu = torch.device("cpu")
    assert autocast_dtype("auto", cpu) is None and autocast_dtype("bf16", cpu) is torch.bfloat16
    captioner, batch = captioner_and_batch
    full = captioner.loss(*batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = captioner.loss(*batch)
    assert float(half) == pytest.approx(float(full), rel=2e-2)


def test_all_throughput_options_together_train(tmp_path, synthetic, registry):
    data = {"train_json": str(synthetic / "train.json"), "train_images": str(synthetic / "images_train")}
    cfg = tiny_config("lora", data=data, train={"max_steps": 2, "batch_size": 8, "amp": "bf16",
                                                 "length_buckets": True, "grad_checkpointing": True})
    result = train(cfg, tmp_path / "run", registry)
    assert result.steps == 2 and result.history[0]["train_loss"] > 0
    assert load_file(result.last_checkpoint)
