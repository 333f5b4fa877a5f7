import torch
import torch.nn.functional as F
from torch import nn


class Projector(nn.Module):
    """Encoder tokens ``(B, N, encoder width)`` -> image tokens ``(B, M, decoder width)``: the
    patch grid average-pooled to ``grid x grid`` (``grid`` None: kept), the CLS/register tokens
    kept as they are, then the projection (a Linear, or Linear -> GELU -> Linear) and dropout."""

    def __init__(self, in_width, out_width, projector, hidden, dropout, prefix, grid_size, grid):
        super().__init__()
        self.prefix, self.grid_size, self.grid = prefix, tuple(grid_size), grid
        if projector == "linear":
            self.proj = nn.Linear(in_width, out_width)
        else:
            self.proj = nn.Sequential(nn.Linear(in_width, hidden), nn.GELU(), nn.Linear(hidden, out_width))
        self.dropout = nn.Dropout(dropout)

    def forward(self, tokens):
        return self.dropout(self.proj(self.reduce(tokens)))

    def reduce(self, tokens):
        """Pooling before the projection: the same tokens for a Linear, at a fraction of its work."""
        if self.grid is None:
            return tokens
        B, _, C = tokens.shape
        patches = tokens[:, self.prefix:].transpose(1, 2).reshape(B, C, *self.grid_size)
        pooled = F.adaptive_avg_pool2d(patches, self.grid).flatten(2).transpose(1, 2)
        return torch.cat([tokens[:, :self.prefix], pooled], dim=1)
