"""Building blocks for the general TTT operator: inner models, inner losses, readouts.

Everything here acts on ONE head and ONE token: parameters without batch/head dims, ``x`` ``[D]``.
The operator vmaps them over tokens and (batch, head).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .._checks import check_eps


def linear(params: tuple[Tensor, Tensor], x: Tensor) -> Tensor:
    """``x W + b`` with W ``[Din, Dout]``, b ``[Dout]``."""
    W, b = params
    return x @ W + b


def linear_no_bias(params: tuple[Tensor], x: Tensor) -> Tensor:
    """``x W`` with W ``[Din, Dout]``: the bias-free last layer of the KV-binding reduction."""
    (W,) = params
    return x @ W


def mlp(params: tuple[Tensor, Tensor, Tensor, Tensor], x: Tensor) -> Tensor:
    """``gelu_tanh(x W1 + b1) W2 + b2`` (the TTT-MLP inner model)."""
    W1, b1, W2, b2 = params
    return F.gelu(x @ W1 + b1, approximate="tanh") @ W2 + b2


def swiglu_no_bias(params: tuple[Tensor, Tensor, Tensor], x: Tensor) -> Tensor:
    """LaCT's fast weight ``(silu(x W0) * (x W2)) W1``, params ``(W0 [D, M], W1 [M, D], W2 [D, M])``."""
    W0, W1, W2 = params
    return (F.silu(x @ W0) * (x @ W2)) @ W1


def _ln(z: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    mu = z.mean()
    return (z - mu) * torch.rsqrt((z - mu).pow(2).mean() + eps) * weight + bias


def mse(pred: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """``0.5 * ||f(k) - v||^2`` (DeltaNet's objective for a linear f)."""
    return 0.5 * (pred - v).pow(2).sum()


def dot_product(pred: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """``-<f(k), v>`` (LaCT): its gradient does not depend on the fast weights' prediction error."""
    return -(pred * v).sum()


def ln_residual_mse(eps: float = 1e-6) -> Callable[..., Tensor]:
    """Sun et al.'s loss ``0.5 * ||LN(f(k)) - (v - k)||^2``; head args ``(ln_weight [D], ln_bias [D])``."""
    eps = check_eps(eps)

    def loss(pred: Tensor, k: Tensor, v: Tensor, ln_weight: Tensor, ln_bias: Tensor) -> Tensor:
        return 0.5 * (_ln(pred, ln_weight, ln_bias, eps) - (v - k)).pow(2).sum()

    return loss


def ln_residual_readout(model: Callable, eps: float = 1e-6) -> Callable[..., Tensor]:
    """Sun et al.'s output rule ``q + LN(f(q))``; head args ``(ln_weight [D], ln_bias [D])``."""
    eps = check_eps(eps)

    def read(params, q: Tensor, ln_weight: Tensor, ln_bias: Tensor) -> Tensor:
        return q + _ln(model(params, q), ln_weight, ln_bias, eps)

    return read


LOSSES: dict[str, Callable[..., Tensor]] = {"mse": mse, "dot": dot_product}
