"""A module for ``nsaconf masks --module``: sliding-window attention with its projections.

    nsaconf masks --module examples/window_block.py:window_block --dim 32 --seq-len 16
    nsaconf masks --module examples/window_block.py:leaky_block --dim 32 --seq-len 16 --fail-on-leak
"""
import torch
import torch.nn.functional as F
from torch import nn


class WindowBlock(nn.Module):
    """x [B, T, dim] -> [B, T, dim]: each position attends to the last ``window`` tokens (``lookahead``
    later ones too: a causality leak)."""

    def __init__(self, dim: int = 32, heads: int = 4, window: int = 4, lookahead: int = 0):
        super().__init__()
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.heads, self.window, self.lookahead = heads, window, lookahead

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        p, s = torch.arange(T, device=x.device)[:, None], torch.arange(T, device=x.device)[None, :]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=(s <= p + self.lookahead) & (s > p - self.window))
        return self.out(o.transpose(1, 2).reshape(B, T, D))


def window_block() -> nn.Module:
    torch.manual_seed(0)  # the same weights every run
    return WindowBlock()


def leaky_block() -> nn.Module:
    torch.manual_seed(0)
    return WindowBlock(lookahead=1)
