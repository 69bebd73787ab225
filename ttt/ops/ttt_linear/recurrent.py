"""TTT-Linear in its primal form: one token at a time, fast weights materialised after every token.

This is the decoding form (a call with T = 1 at any offset inside a mini-batch) and an independent
check of the dual form: it never forms the ``A`` matrix. Layout as in ``chunk.py``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._state import last_token_weights
from ..common import layer_norm, ln_l2_grad, scan_mini_batches
from ..types import TTTInputs, TTTState


def recurrent_ttt_linear(
    x: TTTInputs, state: TTTState, *, causal: bool, eps: float
) -> tuple[Tensor, TTTState]:
    # causal only: its forms-table row says so, and ttt.ops.forms.resolve refuses causal=False
    cd = state.anchor[0].dtype
    q, k, v, lr, lw, lb, te = x.to(cd)
    # per-token views cut once: slicing inside the loop would make the backward quadratic in T
    qs, ks, vs, lrs = (x.split(1, dim=2) for x in (q, k, v, lr))

    def step(start, c, offset, anchor, grad_sum):
        W, bias = anchor
        S_W, S_b = grad_sum
        outs = []
        for t in range(start, start + c):
            q_t, k_t, v_t = qs[t], ks[t], vs[t]  # [B, H, 1, D]
            G = ln_l2_grad(k_t @ W + bias[:, :, None], v_t - k_t, lw, lb, eps)  # [B, H, 1, D]
            eta = lrs[t][..., None]  # [B, H, 1, 1]
            S_W, S_b = S_W + eta * (k_t.transpose(-1, -2) @ G), S_b + eta[..., 0] * G[:, :, 0]
            W_t, b_t = W - te[offset] * S_W, bias - te[offset] * S_b
            outs.append(q_t @ W_t + b_t[:, :, None])
            offset += 1
        return torch.cat(outs, dim=2), (S_W, S_b)

    zs, anchor, grad_sum, offset = scan_mini_batches(
        step, state.anchor, state.grad_sum, state.offset, q.shape[2], te, state.mini_batch_size
    )
    Z = torch.cat(zs, dim=2) if zs else q
    o = q + layer_norm(Z, lw, lb, eps)
    weights = last_token_weights(anchor, grad_sum, offset, te)
    return o, TTTState(weights, anchor, grad_sum, offset, state.mini_batch_size, state.variant)
