"""TTT-MLP, token by token, with the inner gradient taken by autograd (``torch.func.grad``).

Inner model per head: ``f(x) = LN(gelu_tanh(x W1 + b1) W2 + b2)``, inner loss
``0.5 * ||f(k) - (v - k)||^2``, output ``q + f(q)``. Layout: q, k, v ``[B, H, T, D]``; lr ``[B, H, T]``;
W1 ``[B, H, D, M]``, b1 ``[B, H, M]``, W2 ``[B, H, M, D]``, b2 ``[B, H, D]``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..common import gelu_tanh, layer_norm
from ..types import TTTState


def naive_recurrent_ttt_mlp(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lr: Tensor,
    ln_weight: Tensor,
    ln_bias: Tensor,
    token_eta: Tensor,
    state: TTTState,
    *,
    causal: bool,
    eps: float,
) -> tuple[Tensor, TTTState]:
    cd = state.anchor[0].dtype
    q, k, v, lr = (x.to(cd) for x in (q, k, v, lr))
    lw, lb, te = ln_weight.to(cd), ln_bias.to(cd), token_eta.to(cd)
    b, T = state.mini_batch_size, q.shape[2]

    def f(params, x):  # x [B, H, D] -> [B, H, D]
        W1, b1, W2, b2 = params
        hidden = gelu_tanh(torch.einsum("bhd,bhdm->bhm", x, W1) + b1)
        z = torch.einsum("bhm,bhmd->bhd", hidden, W2) + b2
        return layer_norm(z[:, :, None], lw, lb, eps)[:, :, 0]

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
