"""SAM (vlcap.core.train.sam) against its definition: one step from w is
w - lr * grad L(w + rho * g / ||g||) with g = grad L(w), for a plain SGD base."""
import torch

from vlcap.core.train.sam import SAM


def loss_fn(w, a):
    return 0.5 * w @ a @ w + 0.1 * (w ** 3).sum()


def setup():
    torch.manual_seed(0)
    a = torch.randn(6, 6)
    a = a @ a.T
    w0 = torch.randn(6)
    return a, w0


def expected_step(a, w0, lr, rho):
    g = torch.func.grad(loss_fn)(w0, a)
    perturbed = w0 + rho * g / g.norm()
    return w0 - lr * torch.func.grad(loss_fn)(perturbed, a)


def test_a_step_with_a_closure_follows_the_definition():
    a, w0 = setup()
    w = torch.nn.Parameter(w0.clone())
    sam = SAM(torch.optim.SGD([w], lr=0.1), rho=0.05)
    loss_fn(w, a).backward()

    def closure():
        sam.zero_grad()
        loss = loss_fn(w, a)
        loss.backward()
        return loss

    sam.step(closure)
    assert torch.allclose(w.detach(), expected_step(a, w0, 0.1, 0.05), atol=1e-6)


def test_first_step_then_step_is_the_same_update_and_restores_the_ascent():
    a, w0 = setup()
    w = torch.nn.Parameter(w0.clone())
    sam = SAM(torch.optim.SGD([w], lr=0.1), rho=0.05)
    loss_fn(w, a).backward()
    norm = sam.first_step()
    assert torch.isclose(norm, torch.func.grad(loss_fn)(w0, a).norm())
    assert torch.allclose((w.detach() - w0).norm(), torch.tensor(0.05)) and w.grad is None
    loss_fn(w, a).backward()
    sam.step()
    assert torch.allclose(w.detach(), expected_step(a, w0, 0.1, 0.05), atol=1e-6)


def test_state_dict_carries_the_base_optimizers_moments_and_shares_its_learning_rate():
    a, w0 = setup()
    w = torch.nn.Parameter(w0.clone())
    sam = SAM(torch.optim.AdamW([w], lr=0.01), rho=0.1)
    loss_fn(w, a).backward()
    sam.step(lambda: loss_fn(w, a).backward())
    state = sam.state_dict()
    assert state["rho"] == 0.1 and "exp_avg" in state["base"]["state"][0]
    sam.param_groups[0]["lr"] = 0.5  # what a scheduler does
    assert sam.base_optimizer.param_groups[0]["lr"] == 0.5
    other = SAM(torch.optim.AdamW([torch.nn.Parameter(w0.clone())], lr=0.01), rho=0.3)
    other.load_state_dict(state)
    assert other.rho == 0.1 and torch.equal(other.base_optimizer.state_dict()["state"][0]["exp_avg"],
                                            state["base"]["state"][0]["exp_avg"])
