"""The training benchmark's ablation rows (benchmarks/train_throughput.py) turn one optimisation
off without changing what is computed: same loss, same gradients, same optimizer step. So the
speed difference they measure is the optimisation's alone."""
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_config
from vlcap.api import perturb_trainable, pixels_for, tiny_captioner
from vlcap.core.model.tokenizer import IGNORE_INDEX

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import train_throughput as bench  # noqa: E402


def loss_and_gradients(off):
    captioner, _ = tiny_captioner("lora", dropout=0.0)  # no random masks, whose draws would differ by shape
    perturb_trainable(captioner)  # LoRA's B and the cross-attention output would be zero
    pixels = pixels_for(captioner, images=3)
    ids = torch.randint(0, 50257, (3, 9), generator=torch.Generator().manual_seed(3))
    labels = ids.roll(-1, 1)
    labels[0, 4:] = IGNORE_INDEX  # a short, padded caption
    labels[:, -1] = IGNORE_INDEX
    loss_fn, _ = bench.vlcap_setup(captioner.train(), pixels, False, off, None, torch.device("cpu"))
    loss = loss_fn(ids, labels)
    loss.backward()
    return loss, {n: p.grad for n, p in captioner.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("off", [a for a in bench.ABLATIONS if a != "fused AdamW"])
def test_each_ablation_computes_the_same_loss_and_gradients(off):
    loss, grads = loss_and_gradients(None)
    ablated_loss, ablated_grads = loss_and_gradients(off)
    torch.testing.assert_close(ablated_loss, loss)
    assert ablated_grads.keys() == grads.keys()
    for name, grad in grads.items():  # float rounding differs between the forms: relative to the largest entry
        torch.testing.assert_close(ablated_grads[name], grad, rtol=1e-3, atol=1e-4 * float(grad.abs().max()) + 1e-6)


def test_unfused_adamw_takes_the_same_step_as_vlcaps_fused_one():
    cfg = tiny_config("lora")
    steps = []
    for off in (None, "fused AdamW"):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]
        optimizer = bench.optimizer_for(params, cfg, off)
        assert bool(optimizer.defaults["fused"]) == (off is None)
        for p in params:
            p.grad = torch.ones_like(p)
        optimizer.step()
        steps.append([p.detach().clone() for p in params])
    for fused, unfused in zip(*steps):
        torch.testing.assert_close(fused, unfused)
