"""TTT-Linear, token by token, with the inner gradient taken by autograd (``torch.func.grad``).

This is the specification the faster forms are tested against. Inner model per head:
``f(x) = LN(x W + b)``, inner loss ``0.5 * ||f(k) - (v - k)||^2``, output ``q + f(q)``.
Layout: q, k, v ``[B, H, T, D]``, lr ``[B, H, T]``, W ``[B, H, D, D]``, b ``[B, H, D]``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._autograd_reference import autograd_token_loop
from ..types import TTTInputs, TTTState


def linear_model(params: tuple[Tensor, Tensor], x: Tensor) -> Tensor:
    """``x W + b`` per (batch, head): x ``[B, H, D]``."""
    W, b = params
    return torch.einsum("bhd,bhde->bhe", x, W) + b


def naive_recurrent_ttt_linear(
    x: TTTInputs, state: TTTState, *, causal: bool, eps: float
) -> tuple[Tensor, TTTState]:
    return autograd_token_loop(linear_model, x, state, causal=causal, eps=eps)
