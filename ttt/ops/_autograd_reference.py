"""The token-by-token TTT loop shared by the references of TTT-Linear and TTT-MLP.

The inner gradient comes from ``torch.func.grad`` of the inner loss: the references never use the
closed forms the fast paths are built on. Layout: q, k, v ``[B, H, T, D]``, lr ``[B, H, T]``; the
fast weights carry leading ``[B, H]`` dims.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .common import layer_norm
from .types import TTTInputs, TTTState


def autograd_token_loop(
    inner_model: Callable[[tuple[Tensor, ...], Tensor], Tensor],
    x: TTTInputs,
    state: TTTState,
    *,
    causal: bool,
    eps: float,
) -> tuple[Tensor, TTTState]:
    """Sun et al.'s mini-batch TTT with ``f(x) = LN(inner_model(params, x))``, one token at a time.

    ``inner_model(params, x [B, H, D]) -> [B, H, D]``. Token t at position p of its mini-batch reads
    ``theta_t = theta_0 - token_eta[p] * sum_{j <= t in the mini-batch} lr_j grad loss_j(theta_0)``.
    """
    cd = state.anchor[0].dtype
    q, k, v, lr, lw, lb, te = x.to(cd)
    b, T = state.mini_batch_size, q.shape[2]

    def f(params, h):  # h [B, H, D] -> [B, H, D]
        return layer_norm(inner_model(params, h)[:, :, None], lw, lb, eps)[:, :, 0]

    def inner_loss(params, k_t, v_t):
        # summed over (batch, head): their fast weights are disjoint, so the gradients stay separate
        return 0.5 * (f(params, k_t) - (v_t - k_t)).pow(2).sum()

    def scale(eta, g):  # eta [B, H] times a [B, H, ...] gradient
        return eta.reshape(*eta.shape, *([1] * (g.dim() - 2))) * g

    inner_grad = torch.func.grad(inner_loss)
    anchor, grad_sum, offset = state.anchor, state.grad_sum, state.offset
    weights, per_token = state.weights, []
    for t in range(T):
        g = inner_grad(anchor, k[:, :, t], v[:, :, t])
        grad_sum = tuple(s + scale(lr[:, :, t], gi) for s, gi in zip(grad_sum, g))
        weights = tuple(a - te[offset] * s for a, s in zip(anchor, grad_sum))
        per_token.append(weights)
        offset += 1
        if offset == b:  # the next mini-batch starts from the weights of this token
            anchor, grad_sum, offset = weights, tuple(torch.zeros_like(s) for s in grad_sum), 0

    outs = []
    for t in range(T):
        if causal:
            w = per_token[t]
        else:  # every query of a mini-batch reads the weights of the mini-batch's last token
            last = min((((state.offset + t) // b) + 1) * b - state.offset, T) - 1
            w = per_token[last]
        outs.append(q[:, :, t] + f(w, q[:, :, t]))
    o = torch.stack(outs, dim=2) if T else q.clone()
    return o, TTTState(weights, anchor, grad_sum, offset, b, state.variant)
