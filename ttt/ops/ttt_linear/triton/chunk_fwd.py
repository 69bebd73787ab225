"""Fused forward kernel of TTT-Linear (dual form): one program per (batch, head), mini-batch loop inside.

Dims: B batch, H heads, T tokens of this call, D head dim (BD = D padded to a power of two >= 16),
b mini-batch size (BT = b padded to a power of two >= 16), NS mini-batch segments of this call.

Tokens are placed on a virtual grid ``u = offset + t`` so that segment ``n`` always covers grid slots
``[n * b, (n + 1) * b)``; the slots before ``offset`` (first segment) and after ``offset + T`` (last
segment) are masked. The fast weights (anchor W0 [D, D], b0 [D]) and, for the first segment, the
carried gradient sum stay in registers in fp32 for the whole sequence.

Optionally the anchor at the start of every segment is written to ``ckpt_w`` / ``ckpt_b``
([B * H, NS, D, D] / [B * H, NS, D]): the backward recomputes each segment from it, so activation
memory is O(T * D + (T / b) * D^2). ``ckpt_w`` is fp32, or bf16 / fp16 when the dots round their
operands to that dtype (``ttt/ops/triton_shared.py``): the backward uses W only as a dot operand, so it sees the same
rounded anchor either way, at half the memory and traffic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ...triton_shared import (
    _dot,
    _head_params,
    _ln_l2_grad,
    _ln_rows,
    _segment_masks,
    _segment_rows,
    _span,
    checkpoint_dtype,
    dot_precision,
    varlen_plan,
)


@triton.jit
def _inner_grad(b_k, b_v, b_w, b_bias, b_gamma, b_beta, m_row, m_d, D: tl.constexpr, eps, PREC: tl.constexpr):
    """G = d/dZ 0.5 * ||LN(Z) - (v - k)||^2 at Z = k W0 + b0, rows outside m_row zeroed. [BT, BD]"""
    b_z = _dot(b_k, b_w, PREC) + b_bias[None, :]
    b_g, _, _, _, _ = _ln_l2_grad(b_z, b_v - b_k, b_gamma, b_beta, m_row[:, None] & m_d[None, :], m_d, D, eps)
    return b_g


@triton.jit
def _segment_zbar(b_q, b_k, b_g, b_lr, b_w, b_b, b_eta, m_a, PREC: tl.constexpr):
    """Zbar = Q W0 + b0 - (E * (Q K^T + 1)) G with E[i, j] = eta_i lr_j on mask m_a. [BT, BD]"""
    b_p = _dot(b_q, tl.trans(b_k), PREC)
    b_a = tl.where(m_a, b_eta[:, None] * b_lr[None, :] * (b_p + 1.0), 0.0)
    return _dot(b_q, b_w, PREC) + b_b[None, :] - _dot(b_a, b_g, PREC)


@triton.jit
def _fwd_segment(
    n, q, k, v, lr, te, g0_w, g0_b, o, gt_w, gt_b, ckpt_w, ckpt_b, b_w, b_b, b_gamma, b_beta, b_te,
    te_last, i_bh64, tok0, o_i, o_d, m_d, m_dd, o_dd, T, offset, NS, NS_i, eps,
    D: tl.constexpr, MB: tl.constexpr, BT: tl.constexpr, CAUSAL: tl.constexpr, PREC: tl.constexpr,
    STORE_CKPT: tl.constexpr, COMPUTE_O: tl.constexpr, HAS_S: tl.constexpr,
):  # fmt: skip
    """One mini-batch segment: outputs, checkpoint, and the anchor after it. Returns (W, b).

    T, NS_i: this sequence's length and segment count; NS: the checkpoint stride (max over sequences).
    """
    o_t, m_t, b_eta, m_a, p_last, f_done = _segment_masks(n, o_i, offset, T, te, b_te, MB, BT, CAUSAL)
    # q is read only with COMPUTE_O; otherwise its load is dead code the compiler drops
    p_tok, m_td, b_q, b_k, b_v, b_lr = _segment_rows(q, k, v, lr, tok0, o_t, m_t, o_d, m_d, D)
    if STORE_CKPT:
        p_ck = (i_bh64 * NS + n) * D
        tl.store(ckpt_w + p_ck * D + o_dd, b_w.to(ckpt_w.dtype.element_ty), mask=m_dd)
        tl.store(ckpt_b + p_ck + o_d, b_b, mask=m_d)

    b_g = _inner_grad(b_k, b_v, b_w, b_b, b_gamma, b_beta, m_t, m_d, D, eps, PREC)  # [BT, BD]
    if COMPUTE_O:
        b_zb = _segment_zbar(b_q, b_k, b_g, b_lr, b_w, b_b, b_eta, m_a, PREC)
        if HAS_S:
            # gradient sum carried in by the state (tokens of this mini-batch seen by earlier calls)
            b_gw = tl.load(g0_w + i_bh64 * D * D + o_dd, mask=m_dd, other=0.0)
            b_gb = tl.load(g0_b + i_bh64 * D + o_d, mask=m_d, other=0.0)
            b_zb = b_zb - b_eta[:, None] * (_dot(b_q, b_gw, PREC) + b_gb[None, :])
        b_xb, _ = _ln_rows(b_zb, m_d, D, eps)
        b_o = b_q + b_xb * b_gamma[None, :] + b_beta[None, :]
        tl.store(o + p_tok, b_o.to(o.dtype.element_ty), mask=m_td)

    # this segment's lr-weighted gradient sum (plus the carried one in the first segment); no
    # [D, D] accumulator is carried across segments: only the anchor is
    b_lg = b_g * b_lr[:, None]
    b_u = _dot(tl.trans(b_k), b_lg, PREC)
    b_ub = tl.sum(b_lg, axis=0)
    if HAS_S:
        b_u += tl.load(g0_w + i_bh64 * D * D + o_dd, mask=m_dd, other=0.0)
        b_ub += tl.load(g0_b + i_bh64 * D + o_d, mask=m_d, other=0.0)
    # a trailing partial mini-batch hands its gradient sum to the next call; a branch rather than a
    # masked [D, D] store, which costs instructions in every segment
    if n == NS_i - 1:
        tl.store(gt_w + i_bh64 * D * D + o_dd, (1.0 - f_done) * b_u, mask=m_dd)
        tl.store(gt_b + i_bh64 * D + o_d, (1.0 - f_done) * b_ub, mask=m_d)
    # a full mini-batch steps the anchor
    return b_w - (f_done * te_last) * b_u, b_b - (f_done * te_last) * b_ub


@triton.heuristics(
    {
        "STORE_CKPT": lambda args: args["ckpt_w"] is not None,
        "COMPUTE_O": lambda args: args["o"] is not None,
        "IS_VARLEN": lambda args: args["cu_seqlens"] is not None,
    }
)
@triton.jit(do_not_specialize=["T", "offset", "NS"])
def chunk_ttt_linear_fwd_kernel_fused(
    q,
    k,
    v,
    lr,
    te,
    ln_w,
    ln_b,
    h0_w,
    h0_b,
    g0_w,
    g0_b,
    o,
    ht_w,
    ht_b,
    gt_w,
    gt_b,
    ckpt_w,
    ckpt_b,
    cu_seqlens,
    T,
    offset,
    NS,
    eps,
    H: tl.constexpr,
    D: tl.constexpr,
    BD: tl.constexpr,
    MB: tl.constexpr,
    BT: tl.constexpr,
    CAUSAL: tl.constexpr,
    PREC: tl.constexpr,
    STORE_CKPT: tl.constexpr,
    COMPUTE_O: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    i_bh = tl.program_id(0)
    tok0, T_i, NS_i = _span(i_bh, T, NS, offset, cu_seqlens, H, MB, IS_VARLEN)
    i_h = i_bh % H
    # int64 bases: B * H * T * D can pass 2^31
    i_bh64 = i_bh.to(tl.int64)
    o_i = tl.arange(0, BT)
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    m_dd = m_d[:, None] & m_d[None, :]
    o_dd = o_d[:, None] * D + o_d[None, :]

    b_gamma, b_beta, b_te, te_last = _head_params(ln_w, ln_b, te, i_h, o_d, m_d, o_i, D, MB)

    # [BD, BD] anchor and [BD] bias, fp32, resident for the whole sequence
    b_w = tl.load(h0_w + i_bh64 * D * D + o_dd, mask=m_dd, other=0.0)
    b_b = tl.load(h0_b + i_bh64 * D + o_d, mask=m_d, other=0.0)

    # the first segment also reads the gradient sum carried in by the state; it is peeled off the
    # loop (a constexpr flag) rather than branched on inside it
    b_w, b_b = _fwd_segment(
        0, q, k, v, lr, te, g0_w, g0_b, o, gt_w, gt_b, ckpt_w, ckpt_b, b_w, b_b, b_gamma, b_beta, b_te,
        te_last, i_bh64, tok0, o_i, o_d, m_d, m_dd, o_dd, T_i, offset, NS, NS_i, eps,
        D, MB, BT, CAUSAL, PREC, STORE_CKPT, COMPUTE_O, True,
    )  # fmt: skip
    for n in range(1, NS_i):
        b_w, b_b = _fwd_segment(
            n, q, k, v, lr, te, g0_w, g0_b, o, gt_w, gt_b, ckpt_w, ckpt_b, b_w, b_b, b_gamma, b_beta, b_te,
            te_last, i_bh64, tok0, o_i, o_d, m_d, m_dd, o_dd, T_i, offset, NS, NS_i, eps,
            D, MB, BT, CAUSAL, PREC, STORE_CKPT, COMPUTE_O, False,
        )  # fmt: skip

    tl.store(ht_w + i_bh64 * D * D + o_dd, b_w, mask=m_dd)
    tl.store(ht_b + i_bh64 * D + o_d, b_b, mask=m_d)


# software-pipelining depth of the sequential loops (loads of the next segment overlap this one)
NUM_STAGES = 2


def launch_config(D: int, dtype: torch.dtype, prec: str | None = None) -> dict:
    """Block sizes, warps and dot precision shared by the forward and backward launchers (``prec``: the
    backward's, from ``checkpoint_precision``; default ``dot_precision(dtype)``)."""
    BD = max(16, triton.next_power_of_2(D))
    # fp32 inputs get exact fp32 dots; bf16 / fp16 inputs dots in their own dtype or tf32 (triton_shared.py)
    prec = prec or dot_precision(dtype)
    # H200 sweeps (docs/kernels.md): 4 warps at D <= 64 and 8 at D = 128, forward and sequential backward
    nw = 4 if BD <= 64 else 8
    return dict(BD=BD, PREC=prec, num_warps=nw, num_warps_bwd=nw, num_stages=NUM_STAGES)


def chunk_ttt_linear_fwd_fused(
    q: Tensor, k: Tensor, v: Tensor, lr: Tensor, token_eta: Tensor, ln_weight: Tensor, ln_bias: Tensor,
    h0: tuple[Tensor, Tensor], g0: tuple[Tensor, Tensor], *, offset: int, causal: bool, eps: float,
    store_ckpt: bool, cu_seqlens: Tensor | None = None, num_warps: int | None = None, num_stages: int | None = None,
):  # fmt: skip
    """Launch the forward. q, k, v [B, H, T, D] contiguous (or [1, H, sum T_n, D] with ``cu_seqlens``
    [N + 1], then the state has N rows); lr [B, H, T]; h0 / g0 = (W [B, H, D, D], b [B, H, D]) fp32. Returns o [B, H, T, D], (W, b) anchor, (gW, gb) grad sum, and the
    per-segment anchors (ckpt_w [B, H, NS, D, D] in ``checkpoint_dtype``, ckpt_b [B, H, NS, D] fp32) or
    (None, None).
    """
    B, H, T, D = q.shape
    MB = token_eta.shape[0]
    # packed sequences (cu_seqlens [N + 1], q [1, H, sum T_n, D]) run one program per (sequence, head)
    B, NS, _ = varlen_plan(cu_seqlens, offset, MB, B, T)
    cfg = launch_config(D, q.dtype)
    BT = max(16, triton.next_power_of_2(MB))
    o = torch.empty_like(q)
    ht_w, ht_b = torch.empty_like(h0[0]), torch.empty_like(h0[1])
    gt_w, gt_b = torch.empty_like(g0[0]), torch.empty_like(g0[1])
    ckpt_w = ckpt_b = None
    if store_ckpt:
        ckpt_w = q.new_empty(B, H, NS, D, D, dtype=checkpoint_dtype(cfg["PREC"]))
        ckpt_b = q.new_empty(B, H, NS, D, dtype=torch.float32)
    chunk_ttt_linear_fwd_kernel_fused[(B * H,)](
        q, k, v, lr, token_eta, ln_weight, ln_bias, *h0, *g0, o, ht_w, ht_b, gt_w, gt_b, ckpt_w, ckpt_b,
        cu_seqlens, T, offset, NS, eps, H=H, D=D, BD=cfg["BD"], MB=MB, BT=BT, CAUSAL=causal, PREC=cfg["PREC"],
        num_warps=num_warps or cfg["num_warps"], num_stages=num_stages or cfg["num_stages"],
    )  # fmt: skip
    return o, (ht_w, ht_b), (gt_w, gt_b), (ckpt_w, ckpt_b)
