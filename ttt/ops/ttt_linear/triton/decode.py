"""Fused single-token decode step of TTT-Linear: one launch, no host work, CUDA-graph friendly.

One program per (batch, head) reads the token, the anchor ``(W [D, D], b [D])`` and the gradient sum
``(S_W, S_b)`` of the current mini-batch, and in one pass (all fp32):

    z   = k W + b,   g = d/dz 0.5 ||LN(z) - (v - k)||^2       (closed-form LN + L2 gradient)
    S_W += lr k^T g,  S_b += lr g                             (the token joins the gradient sum)
    zq  = q W + b - eta (q S_W + S_b),  eta = token_eta[offset]
    o   = q + LN(zq)
    offset == b - 1 (mini-batch complete):  W -= te[b-1] S_W,  b -= te[b-1] S_b,  S = 0,  offset = 0
    else:                                    offset += 1

It is the primal form of ``recurrent.py`` for T = 1 without materialising the token's weights
``W - eta S_W`` (the query reads them as ``q W - eta q S_W``). Memory traffic per step: the state
(2 D^2 + 2 D floats) read once and written once; nothing else of size D^2.

The offset may be a host int (same for every row) or an int32 device tensor ``[B, H]`` updated in
place: then the step needs no host value at all and can be captured in a CUDA graph. The offset is
per (batch, head) rather than per row so that no program writes a value another program reads.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ...triton_shared import _decode_token, _ln_l2_grad_vec, _ln_vec, check_decode


@triton.heuristics(
    {
        "OFFSET_PTR": lambda args: args["offs"] is not None,
        "STORE_WEIGHTS": lambda args: args["wt_w"] is not None,
    }
)
@triton.jit(do_not_specialize=["off_scalar"])
def ttt_linear_decode_kernel(
    q, k, v, lr, te, ln_w, ln_b, w, bias, sw, sb, w_out, b_out, sw_out, sb_out, wt_w, wt_b, offs, o,
    off_scalar, eps,
    H: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, MB: tl.constexpr,
    INPLACE: tl.constexpr, OFFSET_PTR: tl.constexpr, STORE_WEIGHTS: tl.constexpr,
):  # fmt: skip
    i_bh = tl.program_id(0)
    i_h = i_bh % H
    i_bh64 = i_bh.to(tl.int64)
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    m_dd = m_d[:, None] & m_d[None, :]
    o_dd = o_d[:, None] * D + o_d[None, :]
    p_dd = i_bh64 * D * D + o_dd
    p_d = i_bh64 * D + o_d

    off, eta, te_last, b_q, b_k, b_v, b_lr, b_gamma, b_beta = _decode_token(
        (q, k, v, lr, ln_w, ln_b), te, offs, off_scalar, i_bh, i_h, o_d, m_d, D, MB, OFFSET_PTR
    )

    b_w = tl.load(w + p_dd, mask=m_dd, other=0.0)  # [BD, BD]: rows = input dim, columns = output dim
    b_b = tl.load(bias + p_d, mask=m_d, other=0.0)
    # inner gradient at the anchor
    b_z = tl.sum(b_k[:, None] * b_w, axis=0) + b_b
    b_g = _ln_l2_grad_vec(b_z, b_v - b_k, b_gamma, b_beta, m_d, D, eps) * b_lr
    # the token joins the mini-batch's gradient sum
    b_sw = tl.load(sw + p_dd, mask=m_dd, other=0.0) + b_k[:, None] * b_g[None, :]
    b_sb = tl.load(sb + p_d, mask=m_d, other=0.0) + b_g
    # the query reads W - eta S_W without forming it
    b_zq = tl.sum(b_q[:, None] * (b_w - eta * b_sw), axis=0) + b_b - eta * b_sb
    b_xq, _ = _ln_vec(b_zq, m_d, D, eps)
    tl.store(o + p_d, (b_q + b_xq * b_gamma + b_beta).to(o.dtype.element_ty), mask=m_d)

    if STORE_WEIGHTS:  # the token's own weights (TTTState.weights of the functional form)
        tl.store(wt_w + p_dd, b_w - eta * b_sw, mask=m_dd)
        tl.store(wt_b + p_d, b_b - eta * b_sb, mask=m_d)
    done = off == MB - 1
    if done:  # the mini-batch is complete: step the anchor, restart the sum
        tl.store(w_out + p_dd, b_w - te_last * b_sw, mask=m_dd)
        tl.store(b_out + p_d, b_b - te_last * b_sb, mask=m_d)
        tl.store(sw_out + p_dd, tl.zeros([BD, BD], dtype=tl.float32), mask=m_dd)
        tl.store(sb_out + p_d, tl.zeros([BD], dtype=tl.float32), mask=m_d)
    else:
        if not INPLACE:  # the anchor is unchanged: in place there is nothing to write
            tl.store(w_out + p_dd, b_w, mask=m_dd)
            tl.store(b_out + p_d, b_b, mask=m_d)
        tl.store(sw_out + p_dd, b_sw, mask=m_dd)
        tl.store(sb_out + p_d, b_sb, mask=m_d)
    if OFFSET_PTR:
        tl.store(offs + i_bh, tl.where(done, 0, off + 1))


def _num_warps(BD: int) -> int:
    # the [BD, BD] anchor and gradient sum live in registers: 8 warps keep D = 128 from spilling
    return 4 if BD <= 64 else 8


def ttt_linear_decode_(
    q: Tensor, k: Tensor, v: Tensor, lr: Tensor, ln_weight: Tensor, ln_bias: Tensor, token_eta: Tensor,
    anchor: tuple[Tensor, Tensor], grad_sum: tuple[Tensor, Tensor], offset: Tensor, *, eps: float = 1e-6,
    out: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """One causal TTT-Linear token for every (batch, head), updating the state **in place**.

    No host synchronisation and no allocation (with ``out``): a loop of these calls can be captured in a
    CUDA graph. Same math as ``ttt_linear(..., impl="recurrent")`` for T = 1.

    Args:
        q, k, v: ``[B, H, D]`` (or ``[B, H, 1, D]``) fp32 / bf16 / fp16, contiguous.
        lr: ``[B, H]`` (or ``[B, H, 1]``) inner learning rate of this token.
        ln_weight, ln_bias: ``[H, D]``; token_eta: ``[b]`` (b = mini-batch size).
        anchor: ``(W [B, H, D, D], b [B, H, D])`` fp32, contiguous; updated in place.
        grad_sum: ``(S_W [B, H, D, D], S_b [B, H, D])`` fp32, contiguous; updated in place.
        offset: ``[B, H]`` int32 tokens of the current mini-batch already seen, in ``[0, b)`` (not checked:
            reading it on the host would synchronise); advanced in place.
        eps: LayerNorm epsilon.
        out: optional ``[B, H, D]`` output buffer (dtype of q).
    Returns:
        ``o`` ``[B, H, D]``.
    """
    B, H = lr.shape[:2]
    D = ln_weight.shape[-1]
    check_decode(q, k, v, lr, ln_weight, ln_bias, token_eta, anchor, grad_sum, ((D, D), (D,)), offset, out)
    o = torch.empty((B, H, D), dtype=q.dtype, device=q.device) if out is None else out
    BD = max(16, triton.next_power_of_2(D))
    ttt_linear_decode_kernel[(B * H,)](
        q, k, v, lr, token_eta, ln_weight, ln_bias, *anchor, *grad_sum, *anchor, *grad_sum, None, None,
        offset, o, 0, eps, H=H, D=D, BD=BD, MB=token_eta.shape[0], INPLACE=True, num_warps=_num_warps(BD),
    )  # fmt: skip
    return o


def ttt_linear_decode(
    q: Tensor, k: Tensor, v: Tensor, lr: Tensor, ln_weight: Tensor, ln_bias: Tensor, token_eta: Tensor,
    anchor: tuple[Tensor, Tensor], grad_sum: tuple[Tensor, Tensor], offset: int, *, eps: float,
) -> tuple[Tensor, tuple[Tensor, Tensor], tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:  # fmt: skip
    """Functional form of ``ttt_linear_decode_`` (new state tensors; the inputs are left alone).

    ``offset`` is a host int shared by every row. Returns ``(o [B, H, D], anchor, grad_sum, weights)``
    after the token, where ``weights`` are the token's own fast weights (``TTTState.weights``).
    """
    B, H = lr.shape[:2]
    D = ln_weight.shape[-1]
    check_decode(q, k, v, lr, ln_weight, ln_bias, token_eta, anchor, grad_sum, ((D, D), (D,)))
    o = torch.empty((B, H, D), dtype=q.dtype, device=q.device)
    new_anchor = tuple(torch.empty_like(t) for t in anchor)
    new_sum = tuple(torch.empty_like(t) for t in grad_sum)
    weights = tuple(torch.empty_like(t) for t in anchor)
    BD = max(16, triton.next_power_of_2(D))
    ttt_linear_decode_kernel[(B * H,)](
        q, k, v, lr, token_eta, ln_weight, ln_bias, *anchor, *grad_sum, *new_anchor, *new_sum, *weights,
        None, o, offset, eps, H=H, D=D, BD=BD, MB=token_eta.shape[0], INPLACE=False,
        num_warps=_num_warps(BD),
    )  # fmt: skip
    return o, new_anchor, new_sum, weights
