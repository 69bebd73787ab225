"""The TTT recurrence of a LaCT-style layer, token by token, with every ablation switch of Liu et al.
(2026) Sec. 6, including weight normalisation (which ``ttt.ops.ttt_general`` does not have).

Inner model ``f(x) = (silu(x W0) * (x W2)) W1`` per head, dot-product loss ``-<f(k), v>`` (or the MSE
``1/2 ||f(k) - v||^2``), online steps (mini-batch 1). The inner gradient comes from ``torch.func``.
It is the oracle the parallel form is compared with; slow by design.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import grad, vmap


def _swiglu(params: tuple[Tensor, Tensor, Tensor], x: Tensor) -> Tensor:
    W0, W1, W2 = params
    return (F.silu(x @ W0) * (x @ W2)) @ W1


def _loss(kind: str):
    if kind == "dot":
        return lambda params, k, v: -(_swiglu(params, k) * v).sum()
    if kind == "mse":
        return lambda params, k, v: 0.5 * (_swiglu(params, k) - v).pow(2).sum()
    raise ValueError(f"loss must be 'dot' or 'mse', got {kind!r}")


def lact_recurrent(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    params: tuple[Tensor, Tensor, Tensor],
    *,
    lr: Tensor | float = 1.0,
    loss: str = "dot",
    ascent: bool = False,
    inner_steps: int = 1,
    momentum: float = 0.0,
    update_all: bool = False,
    weight_norm: bool = False,
) -> Tensor:
    """Online TTT of the SwiGLU fast weight, one token at a time.

    Args:
        q, k: [B, H, T, D]; v: [B, H, T, Dv].
        params: ``(W0 [H, D, M], W1 [H, M, Dv], W2 [H, D, M])`` initial fast weights.
        lr: per-token learning rate [B, H, T] or a constant.
        loss: "dot" (LaCT) or "mse".
        ascent: step along +gradient.
        inner_steps: gradient steps per token (all on the same token).
        momentum: ``U_t = mu U_{t-1} + sign * Delta_t``, ``P_t = P_{t-1} - U_t`` (as ttt_general).
        update_all: also train W0 and W2 (a dynamic feature map); default: last layer only.
        weight_norm: after each update rescale every column of W1 to its initial norm (LaCT).

    Returns:
        o [B, H, T, Dv] with ``o_t = f_{P_t}(q_t)`` (read after the update).
    """
    B, H, T, _ = q.shape
    P = tuple(p.unsqueeze(0).expand(B, *p.shape).clone() for p in params)
    norms = P[1].norm(dim=-2, keepdim=True)
    lr = lr if isinstance(lr, Tensor) else torch.full((B, H, T), float(lr), dtype=q.dtype, device=q.device)
    step_grad = vmap(vmap(grad(_loss(loss))))
    read = vmap(vmap(_swiglu))
    trained = (True, True, True) if update_all else (False, True, False)
    sign = -1.0 if ascent else 1.0
    U = tuple(torch.zeros_like(p) for p in P)
    outputs = []
    for t in range(T):
        lr_t = lr[:, :, t].reshape(B, H, 1, 1)
        cur = P
        for _ in range(inner_steps):
            g = step_grad(cur, k[:, :, t], v[:, :, t])
            cur = tuple(c - lr_t * gi if on else c for c, gi, on in zip(cur, g, trained))
        delta = tuple(sign * (p - c) for p, c in zip(P, cur))
        U = tuple(momentum * u + d for u, d in zip(U, delta))
        P = tuple(p - u for p, u in zip(P, U))
        if weight_norm:
            W1 = P[1] * (norms / P[1].norm(dim=-2, keepdim=True))
            P = (P[0], W1, P[2])
        outputs.append(read(P, q[:, :, t]))
    return torch.stack(outputs, dim=2)
