"""The SwiGLU feed-forward block of Llama-style (and TTT) language models."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def swiglu_hidden_dim(dim: int, multiple_of: int = 64) -> int:
    """Llama's default width: 2/3 of 4*dim (3 matrices cost what a 4*dim GELU MLP costs), rounded up."""
    hidden = int(2 * 4 * dim / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))`` (Shazeer, 2020), bias-free as in Llama and ttt-lm-pytorch ``TTTMLP``.

    Args:
        dim: model width C.
        hidden_dim: inner width. Default: :func:`swiglu_hidden_dim` ``(dim)``.
    """

    def __init__(self, dim: int, hidden_dim: int | None = None) -> None:
        super().__init__()
        hidden_dim = hidden_dim or swiglu_hidden_dim(dim)
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, T, C]`` -> ``[B, T, C]``."""
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
