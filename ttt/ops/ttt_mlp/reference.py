"""TTT-MLP, token by token, with the inner gradient taken by autograd (``torch.func.grad``).

Inner model per head: ``f(x) = LN(gelu_tanh(x W1 + b1) W2 + b2)``, inner loss
``0.5 * ||f(k) - (v - k)||^2``, output ``q + f(q)``. Layout: q, k, v ``[B, H, T, D]``; lr ``[B, H, T]``;
W1 ``[B, H, D, M]``, b1 ``[B, H, M]``, W2 ``[B, H, M, D]``, b2 ``[B, H, D]``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._autograd_reference import autograd_token_loop
from ..common import gelu_tanh
from ..types import TTTInputs, TTTState


def mlp_model(params: tuple[Tensor, Tensor, Tensor, Tensor], x: Tensor) -> Tensor:
    """``gelu_tanh(x W1 + b1) W2 + b2`` per (batch, head): x ``[B, H, D]``."""
    W1, b1, W2, b2 = params
    hidden = gelu_tanh(torch.einsum("bhd,bhdm->bhm", x, W1) + b1)
    return torch.einsum("bhm,bhmd->bhd", hidden, W2) + b2


def naive_recurrent_ttt_mlp(
    x: TTTInputs, state: TTTState, *, causal: bool, eps: float
) -> tuple[Tensor, TTTState]:
    return autograd_token_loop(mlp_model, x, state, causal=causal, eps=eps)
