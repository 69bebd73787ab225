"""TTT-Linear in its dual form: all work inside a mini-batch as matmuls, a loop over mini-batches.

Per head, for a mini-batch starting at ``(W, b)`` (derivation in README.md beside this file):

    G    = dLoss/dZ at Z = K W + b                       (closed-form LN + L2 backward)
    Zbar = Q W + b - te * (Q S_W + S_b) - A G,    A[i, j] = te_i lr_j (q_i . k_j + 1), j <= i
    o    = Q + LN(Zbar)

where ``S_W, S_b`` are the lr-weighted gradient sums of the mini-batch's tokens seen in earlier calls.
Layout: q, k, v ``[B, H, T, D]``; lr ``[B, H, T]``; W ``[B, H, D, D]``; b ``[B, H, D]``.

Speed on CPU comes from issuing few, larger ops (the loop is launch-bound at b = 16): the bias is
folded into the weight (``x W + b = [x, 1] [W; b]``), everything that does not depend on the fast
weights (``A``, the LN target terms, the outputs) is batched over all full mini-batches, and only the
weight recurrence loops (``scan.py``, with a hand-written backward).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._state import last_token_weights
from ..common import causal_eta_scores, grad_of_inner_loss, layer_norm
from ..types import TTTInputs, TTTState
from .scan import MiniBatchScan


def chunk_ttt_linear(x: TTTInputs, state: TTTState, *, causal: bool, eps: float) -> tuple[Tensor, TTTState]:
    cd = state.anchor[0].dtype
    q, k, v, lr, lw, lb, te = x.to(cd)
    b, T, offset = state.mini_batch_size, q.shape[2], state.offset
    ones = q.new_ones(*q.shape[:3], 1)
    qa, ka = torch.cat([q, ones], -1), torch.cat([k, ones], -1)  # [B, H, T, D + 1]
    # the LN + L2 gradient needs (LN(z) - t) * w = x * w^2 - (t - beta) * w; precompute the second term
    w2, tw = (lw * lw)[None, :, None], (v - k - lb[None, :, None]) * lw[None, :, None]
    Wa = _fold(*state.anchor)  # [B, H, D + 1, D]
    Sa = _fold(*state.grad_sum)

    def partial(start: int, c: int, offset: int, Wa: Tensor, Sa: Tensor) -> tuple[Tensor, Tensor]:
        """Tokens ``[start, start + c)`` at positions ``offset..`` of a mini-batch, any offset."""
        sl = slice(start, start + c)
        Q, K, LR, te_c = qa[:, :, sl], ka[:, :, sl], lr[:, :, sl], te[offset : offset + c]
        G = grad_of_inner_loss(K @ Wa, tw[:, :, sl], w2, eps)  # dLoss/dZ at Z = K Wa, [B, H, c, D]
        new = Sa + K.transpose(-1, -2) @ (LR[..., None] * G)
        if causal:
            A = causal_eta_scores(Q[..., :-1], K[..., :-1], LR, te_c)
            return Q @ Wa - te_c[:, None] * (Q @ Sa) - A @ G, new
        return Q @ (Wa - te_c[-1] * new), new

    zbars, pos = [], 0
    if offset:  # fill up the mini-batch a previous call started
        c = min(b - offset, T)
        zbar, Sa = partial(0, c, offset, Wa, Sa)
        zbars.append(zbar)
        pos, offset = c, offset + c
        if offset == b:
            Wa, Sa, offset = Wa - te[-1] * Sa, torch.zeros_like(Sa), 0
    n = (T - pos) // b
    if n:  # full mini-batches: everything independent of the fast weights is batched up front
        zbar, Wa = _full_mini_batches(qa, ka, lr, tw, te, Wa, w2, eps, pos, n, b, causal)
        zbars.append(zbar)
        pos += n * b
    if pos < T:  # a trailing partial mini-batch
        zbar, Sa = partial(pos, T - pos, 0, Wa, Sa)
        zbars.append(zbar)
        offset = T - pos
    Zbar = torch.cat(zbars, dim=2) if zbars else q
    o = q + layer_norm(Zbar, lw, lb, eps)
    anchor, grad_sum = _unfold(Wa), _unfold(Sa)
    weights = last_token_weights(anchor, grad_sum, offset, te)
    return o, TTTState(weights, anchor, grad_sum, offset, b, state.variant)


def _full_mini_batches(qa, ka, lr, tw, te, Wa, w2, eps, pos, n, b, causal):
    """``n`` complete mini-batches from position ``pos``, each starting with an empty grad sum."""
    B, H, _, Da = qa.shape
    sl = slice(pos, pos + n * b)
    Q, K = qa[:, :, sl].reshape(B, H, n, b, Da), ka[:, :, sl].reshape(B, H, n, b, Da)
    LR, TW = lr[:, :, sl].reshape(B, H, n, b), tw[:, :, sl].reshape(B, H, n, b, Da - 1)
    # the update every mini-batch ends with: W <- W - te[b-1] * K^T (lr * G)
    Kt = (te[-1] * LR[..., None] * K).transpose(-1, -2)  # [B, H, n, Da, b]
    starts, G, Wa = MiniBatchScan.apply(K, Kt, TW, w2, Wa, eps)  # starts: Wa_i [B, H, n, Da, D]
    if causal:
        A = causal_eta_scores(Q[..., :-1], K[..., :-1], LR, te)  # [B, H, n, b, b]
        zbar = Q @ starts - A @ G
    else:  # every query reads the weights after its mini-batch
        zbar = Q @ (starts - Kt @ G)
    return zbar.reshape(B, H, n * b, Da - 1), Wa


def _fold(W: Tensor, bias: Tensor) -> Tensor:
    return torch.cat([W, bias[:, :, None]], dim=2)


def _unfold(Wa: Tensor) -> tuple[Tensor, Tensor]:
    return Wa[:, :, :-1], Wa[:, :, -1]
