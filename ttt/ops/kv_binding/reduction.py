"""The KV-binding reduction (Liu et al. 2026, arXiv 2602.21204, Thms 5.1-5.3): TTT whose inner model
ends in a linear, bias-free layer is linear attention over learned features.

Inner model ``f(x) = phi(x) W`` with a static feature map ``phi`` (only the last layer W is trained)
and the dot-product loss ``l = -<f(k), v>`` (LaCT). One step with learning rate ``lr_t``:

    W_t = W_{t-1} - sign * lr_t * grad_W l_t = W_{t-1} + phi(k_t)^T (sign * lr_t v_t)

(``sign = +1`` for descent, ``-1`` for ascent), so with q^ = phi(q), k^ = phi(k), v^ = sign lr v,

    o_t = phi(q_t) W_t = q^_t (W_0 + sum_{i <= t} k^_i^T v^_i)        (Thm 5.2)

which is causal linear attention from the initial state W_0. ``n`` inner steps on the same token move
W by ``n`` times the step (the gradient of the dot loss does not depend on W), so v^ gains a factor n.
Momentum ``U_t = mu U_{t-1} + Delta_t`` (ttt_general's convention, ``W_t = W_{t-1} - U_t``) keeps the
form with a Toeplitz weight ``c_{t-i} = sum_{m=0}^{t-i} mu^m`` on pair (t, i) (Thm 5.3); see
``parallel.py``. The derivation and which ablations keep the form: README.md.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _checks


class EffectiveLinearAttention(NamedTuple):
    """The linear attention a KV-binding TTT layer computes.

    Attributes:
        q: phi(q) [B, H, T, M]. k: phi(k) [B, H, T, M]. v: effective values [B, H, T, Dv].
        momentum: mu of the inner optimiser (0: plain linear attention).
    """

    q: Tensor
    k: Tensor
    v: Tensor
    momentum: float


def swiglu_features(W0: Tensor, W2: Tensor) -> Callable[[Tensor], Tensor]:
    """LaCT's fast-weight features ``phi(x) = silu(x W0) * (x W2)``, per head.

    Args:
        W0, W2: [H, D, M] (or [1|B, H, D, M], as stored in a ttt_general state).

    Returns:
        ``phi``: [B, H, T, D] -> [B, H, T, M].
    """
    W0 = W0 if W0.dim() == 3 else W0[0]
    W2 = W2 if W2.dim() == 3 else W2[0]

    def phi(x: Tensor) -> Tensor:
        a = torch.einsum("bhtd,hdm->bhtm", x, W0.to(x.dtype))
        b = torch.einsum("bhtd,hdm->bhtm", x, W2.to(x.dtype))
        return F.silu(a) * b

    return phi


def reduce_kv_binding(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    features: Callable[[Tensor], Tensor],
    lr: Tensor | float = 1.0,
    ascent: bool = False,
    inner_steps: int = 1,
    momentum: float = 0.0,
) -> EffectiveLinearAttention:
    """The effective (q^, k^, v^) of TTT with a static ``features`` map, a trained bias-free linear last
    layer, the dot-product loss and online (per-token) steps.

    Args:
        q, k: [B, H, T, D]; v: [B, H, T, Dv].
        features: ``phi`` [B, H, T, D] -> [B, H, T, M], not updated by the inner loop.
        lr: per-token inner learning rate [B, H, T], or a constant.
        ascent: gradient ascent instead of descent (flips the sign of v^).
        inner_steps: gradient steps per token (scales v^; exact because the loss is linear in W).
        momentum: mu in [0, 1).

    Returns:
        ``EffectiveLinearAttention(q^, k^, v^, momentum)``.
    """
    B, H, T, _ = _checks.check_qkv(q, k, v, same_qk_v_dim=False)
    if not isinstance(inner_steps, int) or inner_steps < 1:
        raise ValueError(f"inner_steps must be a positive int, got {inner_steps!r}")
    momentum = _checks.check_coefficient("momentum", momentum, high_open=True)
    lr = _checks.check_lr(lr, B, H, T, q.device, q.dtype).unsqueeze(-1)  # >= 0: ascent is ascent=True
    sign = -1.0 if ascent else 1.0
    return EffectiveLinearAttention(features(q), features(k), sign * inner_steps * lr * v, momentum)
