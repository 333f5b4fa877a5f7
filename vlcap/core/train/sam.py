"""Sharpness-Aware Minimization (Foret et al., 2021), around any optimizer.

One SAM step at weights ``w`` with gradient ``g = grad L(w)``:

1. ascend to the worst nearby point: ``e = rho * g / ||g||`` (the norm over all parameters),
   ``w <- w + e`` (``first_step``);
2. take the gradient there, ``g' = grad L(w + e)``, go back to ``w`` and let the base optimizer
   step with ``g'`` (``second_step``).

``step(closure)`` runs both, ``closure`` computing the loss and its gradient at the perturbed
weights. A training loop that computes the second gradient itself calls ``first_step``, its
forward and backward, then ``step()`` (no closure), which is ``second_step``. The state dict is
the base optimizer's plus ``rho``: the perturbation only exists inside one step.
"""
import torch


class SAM(torch.optim.Optimizer):
    """Wraps ``base_optimizer`` (its parameter groups, learning rates and state). It is a
    ``torch.optim.Optimizer`` for schedulers' sake, but builds none of that class's own state."""

    def __init__(self, base_optimizer, rho=0.05):
        if not rho > 0:
            raise ValueError(f"SAM rho must be > 0, got {rho}")
        self.base_optimizer = base_optimizer
        self.rho = rho
        self.defaults = dict(base_optimizer.defaults)
        self.param_groups = base_optimizer.param_groups  # shared: a learning-rate scheduler sets both
        self.state = {}  # parameter -> its perturbation e, between first_step and second_step

    def parameters(self):
        return [p for group in self.param_groups for p in group["params"]]

    @torch.no_grad()
    def gradient_norm(self):
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if not grads:
            return torch.tensor(0.0)
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))

    @torch.no_grad()
    def first_step(self, zero_grad=True):
        """Move to ``w + rho * g / ||g||``; returns ``||g||``. The gradients are cleared (for the
        second backward) unless ``zero_grad`` is False."""
        norm = self.gradient_norm()
        scale = self.rho / (norm + 1e-12)
        for p in self.parameters():
            if p.grad is None:
                continue
            e = (p.grad.float() * scale).to(p.dtype)
            p.add_(e)
            self.state[p] = e
        if zero_grad:
            self.zero_grad(set_to_none=True)
        return norm

    @torch.no_grad()
    def second_step(self):
        """Back to ``w``, then the base optimizer's step with the gradient taken at ``w + e``."""
        for p, e in self.state.items():
            p.sub_(e)
        self.state = {}
        self.base_optimizer.step()

    def step(self, closure=None):
        if closure is not None:
            self.first_step(zero_grad=True)
            with torch.enable_grad():
                loss = closure()
            self.second_step()
            return loss
        if not self.state:
            raise RuntimeError("SAM.step() without a closure needs first_step() and a backward pass before it")
        self.second_step()
        return None

    def zero_grad(self, set_to_none=True):
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {"base": self.base_optimizer.state_dict(), "rho": self.rho}

    def load_state_dict(self, state_dict):
        self.base_optimizer.load_state_dict(state_dict["base"])
        self.rho = state_dict["rho"]
        self.param_groups = self.base_optimizer.param_groups
