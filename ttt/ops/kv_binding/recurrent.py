"""The TTT recurrence of a LaCT-style layer, token by token, with every ablation switch of Liu et al.
(2026) Sec. 6, including weight normalisation (which ``ttt.ops.ttt_general`` does not have).

Inner model ``f(x) = (silu(x W0) * (x W2)) W1`` per head, dot-product loss ``-<f(k), v>`` (or the MSE
``1/2 ||f(k) - v||^2``), online steps (mini-batch 1) or LaCT's shifted block-causal chunks, with or
without Muon. The inner gradient comes from ``torch.func``.
It is the oracle the parallel form is compared with; slow by design.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import grad, vmap

from .. import _checks
from .muon import MUON_NEEDS_CHUNKS, newton_schulz


def _swiglu(params: tuple[Tensor, Tensor, Tensor], x: Tensor) -> Tensor:
    W0, W1, W2 = params
    return (F.silu(x @ W0) * (x @ W2)) @ W1


def _loss(kind: str):
    """Learning-rate-weighted loss of a block of tokens, ``sum_t lr_t l(f(k_t), v_t)``: its gradient
    at the block's starting weights is the sum of the block's per-token steps."""
    if kind == "dot":
        per_token = lambda params, k, v: -(_swiglu(params, k) * v).sum(-1)  # noqa: E731
    elif kind == "mse":
        per_token = lambda params, k, v: 0.5 * (_swiglu(params, k) - v).pow(2).sum(-1)  # noqa: E731
    else:
        raise ValueError(f"loss must be 'dot' or 'mse', got {kind!r}")
    return lambda params, k, v, lr: (lr * per_token(params, k, v)).sum()


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
    shifted_chunk_size: int | None = None,
    muon: bool = False,
) -> Tensor:
    """Online TTT of the SwiGLU fast weight, one token (or one LaCT chunk) at a time.

    Args:
        q, k: [B, H, T, D]; v: [B, H, T, Dv].
        params: ``(W0 [H, D, M], W1 [H, M, Dv], W2 [H, D, M])`` initial fast weights.
        lr: per-token learning rate [B, H, T] or a constant.
        loss: "dot" (LaCT) or "mse".
        ascent: step along +gradient.
        inner_steps: gradient steps per token (per chunk), all on the same token (chunk).
        momentum: ``U_t = mu U_{t-1} + sign * Delta_t``, ``P_t = P_{t-1} - U_t`` (as ttt_general).
        update_all: also train W0 and W2 (a dynamic feature map); default: last layer only.
        weight_norm: after each update rescale every column of each trained fast weight (W1; W0 and W2
            too with ``update_all``) to its initial norm, as LaCT does.
        shifted_chunk_size: C: LaCT's shifted block-causal chunks. Chunk i (C tokens, the last may be
            shorter) is answered with the weights after chunks < i; then one step on the
            lr-weighted sum of chunk i's losses, all gradients at the weights before chunk i
            (momentum per chunk). The last chunk is only answered. Default: None (online steps).
        muon: replace each step ``U_t`` by ``newton_schulz(U_t)`` (after momentum, per trained
            matrix). Needs ``shifted_chunk_size``.

    Returns:
        o [B, H, T, Dv]: ``o_t = f_{P_t}(q_t)`` (read after the update) online, ``f_{P_{<i}}(q_t)``
        (read before chunk i) with ``shifted_chunk_size``.
    """
    if muon and shifted_chunk_size is None:
        raise ValueError(MUON_NEEDS_CHUNKS)
    B, H, T, D = _checks.check_qkv(q, k, v, same_qk_v_dim=False)
    _checks.check_swiglu_weights(params, H, D, v.shape[-1])
    P = tuple(p.unsqueeze(0).expand(B, *p.shape).clone() for p in params)
    norms = tuple(p.norm(dim=-2, keepdim=True) for p in P)
    lr = _checks.check_lr(lr, B, H, T, q.device, q.dtype)  # >= 0: gradient ascent is ascent=True
    momentum = _checks.check_coefficient("momentum", momentum, high_open=True)
    step_grad = vmap(vmap(grad(_loss(loss))))
    read = vmap(vmap(_swiglu))
    trained = (True, True, True) if update_all else (False, True, False)
    sign = -1.0 if ascent else 1.0
    U = tuple(torch.zeros_like(p) for p in P)
    read_before = shifted_chunk_size is not None
    C = shifted_chunk_size or 1
    outputs = []
    for start in range(0, T, C):
        block = slice(start, start + C)
        if read_before:
            outputs.append(read(P, q[:, :, block]))
            if start + C >= T:
                break
        cur = P
        for _ in range(inner_steps):
            g = step_grad(cur, k[:, :, block], v[:, :, block], lr[:, :, block])
            cur = tuple(c - gi if on else c for c, gi, on in zip(cur, g, trained))
        delta = tuple(sign * (p - c) for p, c in zip(P, cur))
        U = tuple(momentum * u + d for u, d in zip(U, delta))
        step = tuple(newton_schulz(u) if muon and on else u for u, on in zip(U, trained))
        P = tuple(p - s for p, s in zip(P, step))
        if weight_norm:
            P = tuple(p * (n / p.norm(dim=-2, keepdim=True)) if on else p
                      for p, n, on in zip(P, norms, trained))  # fmt: skip
        if not read_before:
            outputs.append(read(P, q[:, :, block]))
    if not outputs:  # T = 0, as every op: an empty output
        return q.new_zeros(B, H, 0, params[1].shape[-1])
    return torch.cat(outputs, dim=2)
