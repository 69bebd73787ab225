"""The sequential part of the dual form, with a hand-written backward (README.md, "Backward").

Only the recurrence over full mini-batches is sequential:

    G_i     = g(K_i Wa_i)                    g = closed-form gradient of 0.5 ||LN(z) - t||^2
    Wa_{i+1} = Wa_i - Kt_i G_i               Kt_i = te[b-1] * (lr_i * K_i)^T

Everything else (outputs, gradients w.r.t. K, Kt, targets) is batched over all mini-batches outside
the loops. Autograd through a Python loop that indexes big tensors is quadratic in the number of
mini-batches (each ``select`` backward materialises a full-size zero tensor); the hand-written
backward writes into preallocated buffers instead and stays linear.
Shapes: K ``[B, H, n, b, Da]``, Kt ``[B, H, n, Da, b]``, targets TW ``[B, H, n, b, D]``,
``w2 [1, H, 1, D]``, Wa ``[B, H, Da, D]`` (Da = D + 1: the bias is folded into the weight).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._compile import maybe_compiled
from ..common import grad_of_inner_loss


class MiniBatchScan(torch.autograd.Function):
    """``(K, Kt, TW, w2, Wa0) -> (Wa_i for every mini-batch [B, H, n, Da, D], G [B, H, n, b, D], Wa_n)``."""

    @staticmethod
    def forward(ctx, K, Kt, TW, w2, Wa, eps):
        starts, grads = [], []
        step = maybe_compiled(_forward_step)
        # grad mode is off here; without requires_grad the first step sees the same inputs as the rest
        # (one compiled graph, not two)
        Wa = Wa.detach()
        for i in range(K.shape[2]):
            starts.append(Wa)
            G, Wa = step(K[:, :, i], Kt[:, :, i], TW[:, :, i], w2, Wa, eps)
            grads.append(G)
        starts, grads = torch.stack(starts, 2), torch.stack(grads, 2)
        ctx.save_for_backward(K, Kt, TW, w2, starts, grads)
        ctx.eps = eps
        return starts, grads, Wa

    @staticmethod
    def backward(ctx, d_starts, d_grads, d_final):
        K, Kt, TW, w2, starts, grads = ctx.saved_tensors
        B, H, n, b, D = grads.shape
        d_starts = torch.zeros_like(starts) if d_starts is None else d_starts
        d_grads = torch.zeros_like(grads) if d_grads is None else d_grads
        dW = torch.zeros_like(starts[:, :, 0]) if d_final is None else d_final
        Z = K @ starts  # [B, H, n, b, D]
        x, _, rstd = torch.native_layer_norm(Z, (D,), None, None, ctx.eps)
        gx = x * w2[:, :, None] - TW  # w2 [1, H, 1, D] -> [1, H, 1, 1, D]
        m2 = (gx * x).mean(-1, keepdim=True)
        KtT = Kt.transpose(-1, -2)  # [B, H, n, b, Da]
        dG_total, dZ_all, dW_after = (
            torch.empty_like(grads),
            torch.empty_like(grads),
            torch.empty_like(starts),
        )
        step = maybe_compiled(_backward_step)
        for i in range(n - 1, -1, -1):
            dW_after[:, :, i] = dW
            per_step = (d_grads, d_starts, KtT, K, x, rstd, gx, m2)
            dG, dZ, dW = step(dW, *(t[:, :, i] for t in per_step), w2)
            dG_total[:, :, i], dZ_all[:, :, i] = dG, dZ
        dK = dZ_all @ starts.transpose(-1, -2)
        dKt = -(dW_after @ grads.transpose(-1, -2))
        du = rstd * dG_total
        dgx = du - du.mean(-1, keepdim=True) - x * (du * x).mean(-1, keepdim=True)
        d_w2 = (dgx * x).sum(dim=(0, 2, 3))[None, :, None] if ctx.needs_input_grad[3] else None
        return dK, dKt, -dgx, d_w2, dW, None


def _forward_step(K: Tensor, Kt: Tensor, TW: Tensor, w2: Tensor, Wa: Tensor, eps: float):
    """One mini-batch: ``G = g(K Wa)`` ``[B, H, b, D]`` and the next weights ``Wa - Kt G``."""
    G = grad_of_inner_loss(K @ Wa, TW, w2, eps)
    return G, Wa - Kt @ G


def _backward_step(dW, d_grads, d_starts, KtT, K, x, rstd, gx, m2, w2):
    """One mini-batch of the reverse sweep, given ``dW``, the gradient w.r.t. the weights after it.

    Returns ``dG``, ``dZ`` (w.r.t. its inner gradient and ``Z = K Wa``) and the gradient w.r.t. the
    weights it started from.
    """
    dG = d_grads - KtT @ dW  # [B, H, b, D]
    dZ = _inner_grad_vjp(dG, x, rstd, gx, m2, w2)
    return dG, dZ, dW + d_starts + K.transpose(-1, -2) @ dZ


def _inner_grad_vjp(dG: Tensor, x: Tensor, rstd: Tensor, gx: Tensor, m2: Tensor, w2: Tensor) -> Tensor:
    """``dZ = (dG/dZ)^T dG`` for ``G = r * (gx - mean(gx) - x * m2)``, ``m2 = mean(gx * x)``,
    ``gx = x * w2 - TW``, ``x = LN(Z)``, ``r = rsqrt(var(Z) + eps)`` (derivation in README.md)."""
    u = gx - gx.mean(-1, keepdim=True) - x * m2
    dr = (dG * u).sum(-1, keepdim=True)
    du = rstd * dG
    m_du, m_dux = du.mean(-1, keepdim=True), (du * x).mean(-1, keepdim=True)
    dgx = du - m_du - x * m_dux
    dx = dgx * w2 - du * m2 - m_dux * gx
    dZ = rstd * (dx - dx.mean(-1, keepdim=True) - x * (dx * x).mean(-1, keepdim=True))
    return dZ - (dr * rstd * rstd / x.shape[-1]) * x
