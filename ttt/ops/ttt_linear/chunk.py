"""TTT-Linear in its dual form: all work inside a mini-batch as matmuls, a loop over mini-batches.

Per head, for a mini-batch starting at ``(W, b)`` (derivation in README.md beside this file):

    G    = dLoss/dZ at Z = K W + b                       (closed-form LN + L2 backward)
    Zbar = Q W + b - te * (Q S_W + S_b) - A G,    A[i, j] = te_i lr_j (q_i . k_j + 1), j <= i
    o    = Q + LN(Zbar)

where ``S_W, S_b`` are the lr-weighted gradient sums of the mini-batch's tokens seen in earlier calls.
Layout: q, k, v ``[B, H, T, D]``; lr ``[B, H, T]``; W ``[B, H, D, D]``; b ``[B, H, D]``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._state import last_token_weights
from ..common import causal_eta_scores, layer_norm, ln_l2_grad, scan_mini_batches
from ..types import TTTState


def chunk_ttt_linear(
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

    def step(start, c, offset, anchor, grad_sum):
        W, bias = anchor
        S_W, S_b = grad_sum
        Q, K, V, LR = (
            q[:, :, start : start + c],
            k[:, :, start : start + c],
            v[:, :, start : start + c],
            lr[:, :, start : start + c],
        )
        te_c = te[offset : offset + c]
        G = ln_l2_grad(K @ W + bias[:, :, None], V - K, lw, lb, eps)  # [B, H, c, D]
        LG = LR[..., None] * G
        S_W, S_b = S_W + K.transpose(-1, -2) @ LG, S_b + LG.sum(2)
        if causal:
            A = causal_eta_scores(Q, K, LR, te_c)  # [B, H, c, c]
            prev_W, prev_b = grad_sum
            Zbar = Q @ W + bias[:, :, None] - te_c[:, None] * (Q @ prev_W + prev_b[:, :, None]) - A @ G
        else:
            Zbar = Q @ (W - te_c[-1] * S_W) + (bias - te_c[-1] * S_b)[:, :, None]
        return Zbar, (S_W, S_b)

    zbars, anchor, grad_sum, offset = scan_mini_batches(
        step, state.anchor, state.grad_sum, state.offset, T, te, b
    )
    Zbar = torch.cat(zbars, dim=2) if zbars else q
    o = q + layer_norm(Zbar, lw, lb, eps)
    weights = last_token_weights(anchor, grad_sum, offset, te)
    return o, TTTState(weights, anchor, grad_sum, offset, b, state.variant)
