"""TTT-MLP in its dual form, layer by layer (derivation in ../ttt_linear/README.md, section TTT-MLP).

For a mini-batch starting at ``(W1, b1, W2, b2)``, with all inner gradients taken there:

    Z1 = K W1 + b1,  X2 = gelu(Z1),  Z2 = X2 W2 + b2
    G2 = dLoss/dZ2 (LN + L2),        G1 = (G2 W2^T) * gelu'(Z1)
    Z1bar = Q W1 + b1 - te * (Q S_W1 + S_b1) - A1 G1,      A1[i, j] = te_i lr_j (q_i . k_j + 1)
    X2bar = gelu(Z1bar)
    Z2bar = X2bar W2 + b2 - te * (X2bar S_W2 + S_b2) - A2 G2, A2[i, j] = te_i lr_j (X2bar_i . X2_j + 1)
    o = Q + LN(Z2bar)
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._compile import maybe_compiled
from .._state import last_token_weights
from ..common import (
    causal_eta_scores,
    gelu_tanh,
    grad_of_inner_loss,
    layer_norm,
    scan_mini_batches,
    split_segments,
    split_time,
)
from ..types import TTTInputs, TTTState


def chunk_ttt_mlp(x: TTTInputs, state: TTTState, *, causal: bool, eps: float) -> tuple[Tensor, TTTState]:
    cd = state.anchor[0].dtype
    q, k, v, lr, lw, lb, te = x.to(cd)
    b, T = state.mini_batch_size, q.shape[2]
    segments = split_segments(T, state.offset, b)
    # the LN + L2 gradient needs (LN(z) - t) * w = x * w^2 - (t - beta) * w; precompute the second term
    w2, tw = (lw * lw)[None, :, None], (v - k - lb[None, :, None]) * lw[None, :, None]
    qs, ks, lrs, tws = (split_time(x, segments) for x in (q, k, lr[..., None], tw))
    segment, anchor = maybe_compiled(dual_segment), state.anchor
    if segment is not dual_segment:
        # a broadcast initial state (stride 0 over B) would cost one more compiled graph
        anchor = tuple(a.contiguous() for a in anchor)

    def step(start, c, offset, anchor, grad_sum):
        te_c = te[offset : offset + c]
        return segment(qs[start], ks[start], lrs[start][..., 0], tws[start], te_c, anchor, grad_sum,
                       w2, eps, causal)  # fmt: skip

    zbars, anchor, grad_sum, offset = scan_mini_batches(step, anchor, state.grad_sum, state.offset, T, te, b)
    Zbar = torch.cat(zbars, dim=2) if zbars else q
    o = q + layer_norm(Zbar, lw, lb, eps)
    weights = last_token_weights(anchor, grad_sum, offset, te)
    return o, TTTState(weights, anchor, grad_sum, offset, b, state.variant)


def dual_segment(
    Q: Tensor,
    K: Tensor,
    LR: Tensor,
    TW: Tensor,
    te_c: Tensor,
    anchor: tuple[Tensor, ...],
    grad_sum: tuple[Tensor, ...],
    w2: Tensor,
    eps: float,
    causal: bool,
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """One segment of a mini-batch (tokens at positions ``te_c`` of it) in the dual form.

    Q, K ``[B, H, c, D]``; LR ``[B, H, c]``; ``TW = (v - k - ln_bias) * ln_weight`` ``[B, H, c, D]``;
    ``w2 = ln_weight^2`` ``[1, H, 1, D]``. Returns the pre-LN output ``Z2bar [B, H, c, D]`` and the grad sum
    including these tokens.
    """
    W1, b1, W2, b2 = anchor
    Z1 = K @ W1 + b1[:, :, None]  # [B, H, c, M]
    X2 = gelu_tanh(Z1)
    G2 = grad_of_inner_loss(X2 @ W2 + b2[:, :, None], TW, w2, eps)  # [B, H, c, D]
    # the GELU backward in one fused (twice-differentiable) op: (G2 W2^T) * gelu'(Z1)
    G1 = torch.ops.aten.gelu_backward(G2 @ W2.transpose(-1, -2), Z1, approximate="tanh")  # [B, H, c, M]
    LG1, LG2 = LR[..., None] * G1, LR[..., None] * G2
    prev = grad_sum
    new = (
        prev[0] + K.transpose(-1, -2) @ LG1,
        prev[1] + LG1.sum(2),
        prev[2] + X2.transpose(-1, -2) @ LG2,
        prev[3] + LG2.sum(2),
    )
    if causal:
        te_col = te_c[:, None]
        Z1bar = Q @ W1 + b1[:, :, None] - te_col * (Q @ prev[0] + prev[1][:, :, None])
        Z1bar = Z1bar - causal_eta_scores(Q, K, LR, te_c) @ G1
        X2bar = gelu_tanh(Z1bar)
        Z2bar = X2bar @ W2 + b2[:, :, None] - te_col * (X2bar @ prev[2] + prev[3][:, :, None])
        Z2bar = Z2bar - causal_eta_scores(X2bar, X2, LR, te_c) @ G2
    else:
        W1e, b1e, W2e, b2e = (a - te_c[-1] * s for a, s in zip(anchor, new))
        Z2bar = gelu_tanh(Q @ W1e + b1e[:, :, None]) @ W2e + b2e[:, :, None]
    return Z2bar, new
