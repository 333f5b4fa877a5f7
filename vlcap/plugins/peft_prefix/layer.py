import torch
from torch import nn

from vlcap.api import split_heads


class PrefixTable(nn.Module):
    """Key/value prefixes for ``n_layers`` self-attention layers: a table ``(layers, 2, P, width)``,
    either stored directly (``kv``) or produced from an embedding by an MLP (reparameterised)."""

    def __init__(self, n_layers, n_head, width, length, reparam, hidden):
        super().__init__()
        self.shape = (n_layers, 2, length, width)
        self.n_head = n_head
        if reparam:
            self.embedding = nn.Parameter(torch.randn(length, width) * 0.02)
            self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.Tanh(), nn.Linear(hidden, n_layers * 2 * width))
        else:
            self.kv = nn.Parameter(torch.randn(*self.shape) * 0.02)

    def table(self):
        if hasattr(self, "kv"):
            return self.kv
        n_layers, _, length, width = self.shape
        return self.mlp(self.embedding).view(length, n_layers, 2, width).permute(1, 2, 0, 3)

    def layer_kv(self, index, batch_size):
        """``(k, v)`` for the ``index``-th prefixed layer, each ``(B, n_head, P, head_dim)``."""
        k, v = self.table()[index]
        return tuple(split_heads(t.unsqueeze(0), self.n_head).expand(batch_size, -1, -1, -1) for t in (k, v))
