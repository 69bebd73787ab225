"""Backward of TTT-Linear in two launches: a parallel per-segment pass, then the sequential recurrence.

Dims as in ``chunk_fwd.py``. Each segment is recomputed from the anchor the forward checkpointed at its
start (``ckpt_w`` / ``ckpt_b``). Per segment (anchor W0, b0; carried gradient sum S = (gW, gb) only in
the first segment):

    Z  = K W0 + b0,   G = LN-L2 gradient at Z (rows outside the call zeroed)
    Zb = Q W0 + b0 - eta * (Q gW + gb) - (E * (Q K^T + 1)) G,   o = Q + LN(Zb)
    U  = K^T (lr * G), u = sum_j lr_j G_j
    full mini-batch:   W0' = W0 - te[b-1] (S + U)   (gradient sum restarts at zero)
    partial (last):    W0' = W0,  S' = S + U

1. ``chunk_ttt_linear_bwd_kernel_local`` (grid NS x B*H, no recurrence): everything that does not need
   the gradient flowing back from later segments: dZb through the output LayerNorm, dq (complete),
   the parts of dk, dlr, d token_eta, d LN params from the output path, and dG_local = -(E * (QK^T+1))^T dZb.
   dZb and dG_local go to fp32 buffers ([B, H, T, D] each).
2. ``chunk_ttt_linear_bwd_kernel_seq`` (grid B*H): segments in reverse, carrying dW [D, D], db [D] (the
   gradient w.r.t. the anchor leaving the segment) in registers: dG = dG_local + lr * (K dU + du), the
   second-order LN-L2 backward to dZ, and dW += Q^T dZb + K^T dZ. Six [b, D] x [D, D]-sized matmuls per
   segment sit on this sequential path (fourteen before the split).
The first and last segments of the reverse sweep are peeled off with constexpr flags (only they need
the extra [D, D] tiles); in the parallel kernel only the program of segment 0 takes the branch that
reads the carried gradient sum.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ...triton_shared import (
    _dot,
    _ln_l2_grad,
    _ln_l2_grad_bwd,
    _ln_rows,
    _ln_rows_bwd,
    _program,
    _segment_masks,
    _segment_rows,
    checkpoint_precision,
    varlen_plan,
)
from .chunk_fwd import launch_config


@triton.jit
def _recompute_inner(
    b_k, b_v, b_w, b_b, b_gamma, b_beta, m_td, m_d, D: tl.constexpr, eps, PREC: tl.constexpr
):
    """G at Z = K W0 + b0 with the intermediates the second-order backward needs: (G, xhat, rstd, gx, m2)."""
    b_z = _dot(b_k, b_w, PREC) + b_b[None, :]
    return _ln_l2_grad(b_z, b_v - b_k, b_gamma, b_beta, m_td, m_d, D, eps)


@triton.heuristics({"IS_VARLEN": lambda args: args["cu_seqlens"] is not None})
@triton.jit(do_not_specialize=["T", "offset", "NS"])
def chunk_ttt_linear_bwd_kernel_local(
    q,
    k,
    v,
    lr,
    te,
    ln_w,
    ln_b,
    ckpt_w,
    ckpt_b,
    g0_w,
    g0_b,
    do,
    dq,
    dk_f,
    dlr_f,
    dzb_f,
    dgl_f,
    dte_p,
    dlnw_p,
    dlnb_p,
    dg0l_w,
    dg0l_b,
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
    IS_VARLEN: tl.constexpr,
):
    n, i_bh = tl.program_id(0), tl.program_id(1)
    tok0, T_i, NS_i, i_bh64, o_i, o_d, m_d, b_gamma, b_beta, b_te, te_last = _program(
        i_bh, T, NS, offset, cu_seqlens, ln_w, ln_b, te, H, D, BD, MB, BT, IS_VARLEN
    )
    m_dd = m_d[:, None] & m_d[None, :]
    o_dd = o_d[:, None] * D + o_d[None, :]

    o_t, m_t, b_eta, m_a, p_last, f_done = _segment_masks(n, o_i, offset, T_i, te, b_te, MB, BT, CAUSAL)
    p_tok, m_td, b_q, b_k, b_v, b_lr = _segment_rows(q, k, v, lr, tok0, o_t, m_t, o_d, m_d, D)
    b_do = tl.load(do + p_tok, mask=m_td, other=0.0).to(tl.float32)
    p_ck = (i_bh64 * NS + n) * D
    # segments past the end of a short packed sequence were never checkpointed: read zeros (their
    # rows are all masked, so every partial they write is zero)
    b_w = tl.load(ckpt_w + p_ck * D + o_dd, mask=m_dd & (o_dd * 0 + n < NS_i), other=0.0)
    b_b = tl.load(ckpt_b + p_ck + o_d, mask=m_d & (o_d * 0 + n < NS_i), other=0.0)

    b_g, b_xh, b_rstd, b_gx, b_m2 = _recompute_inner(
        b_k, b_v, b_w, b_b, b_gamma, b_beta, m_td, m_d, D, eps, PREC
    )
    b_p = _dot(b_q, tl.trans(b_k), PREC)
    b_a = tl.where(m_a, b_eta[:, None] * b_lr[None, :] * (b_p + 1.0), 0.0)
    # the carried gradient sum S = (gW, gb) exists only in segment 0: a runtime branch, so the other
    # segments neither load its [D, D] tile nor spend three dots on zeros
    if n == 0:
        b_gw = tl.load(g0_w + i_bh64 * D * D + o_dd, mask=m_dd, other=0.0)
        b_zs = _dot(b_q, b_gw, PREC) + tl.load(g0_b + i_bh64 * D + o_d, mask=m_d, other=0.0)[None, :]
    else:
        b_zs = tl.zeros([BT, BD], dtype=tl.float32)
    b_zb = _dot(b_q, b_w, PREC) + b_b[None, :] - _dot(b_a, b_g, PREC)
    b_zb = b_zb - b_eta[:, None] * b_zs
    b_xb, b_rstdb = _ln_rows(b_zb, m_d, D, eps)

    # output LayerNorm
    tl.store(dlnw_p + (i_bh64 * NS + n) * D + o_d, tl.sum(b_do * b_xb, axis=0), mask=m_d)
    tl.store(dlnb_p + (i_bh64 * NS + n) * D + o_d, tl.sum(b_do, axis=0), mask=m_d)
    b_dzb = tl.where(m_td, _ln_rows_bwd(b_do * b_gamma[None, :], b_xb, b_rstdb, D), 0.0)
    b_edz = b_eta[:, None] * b_dzb

    # intra-segment term -(E * (Q K^T + 1)) G
    b_dam = -_dot(b_dzb, tl.trans(b_g), PREC)  # [BT, BT]
    b_dgl = -_dot(tl.trans(b_a), b_dzb, PREC)
    b_dp = tl.where(m_a, b_dam * b_eta[:, None] * b_lr[None, :], 0.0)
    b_dem = tl.where(m_a, b_dam * (b_p + 1.0), 0.0)
    b_deta = tl.sum(b_dem * b_lr[None, :], axis=1) - tl.sum(b_dzb * b_zs, axis=1)
    b_dlr = tl.sum(b_dem * b_eta[:, None], axis=0)
    b_dq = b_do + _dot(b_dzb, tl.trans(b_w), PREC)
    b_dq += _dot(b_dp, b_k, PREC)
    b_dk = _dot(tl.trans(b_dp), b_q, PREC)

    tl.store(dk_f + p_tok, b_dk, mask=m_td)
    tl.store(dzb_f + p_tok, b_dzb, mask=m_td)
    tl.store(dgl_f + p_tok, b_dgl, mask=m_td)
    tl.store(dlr_f + tok0 + o_t, b_dlr, mask=m_t)
    if CAUSAL:
        b_dte = tl.where(m_t, b_deta, 0.0)
    else:
        b_dte = tl.where(o_i == p_last, tl.sum(tl.where(m_t, b_deta, 0.0), axis=0), 0.0)
    tl.store(dte_p + (i_bh64 * NS + n) * MB + o_i, b_dte, mask=o_i < MB)
    # gradient sum carried in: its output-path gradient (segment 0 only)
    if n == 0:
        b_gw = tl.load(g0_w + i_bh64 * D * D + o_dd, mask=m_dd, other=0.0)
        b_dq -= _dot(b_edz, tl.trans(b_gw), PREC)
        tl.store(dg0l_w + i_bh64 * D * D + o_dd, -_dot(tl.trans(b_q), b_edz, PREC), mask=m_dd)
        tl.store(dg0l_b + i_bh64 * D + o_d, -tl.sum(b_edz, axis=0), mask=m_d)
    tl.store(dq + p_tok, b_dq.to(dq.dtype.element_ty), mask=m_td)


@triton.jit
def _seq_segment(
    n, ptrs, carry, head, pos,
    D: tl.constexpr, MB: tl.constexpr, BT: tl.constexpr, PREC: tl.constexpr,
    PARTIAL: tl.constexpr, HAS_S: tl.constexpr,
):  # fmt: skip
    """Segment n of the reverse sweep; returns the carried (dW, db, dte, dgamma, dbeta).

    Arguments bundled as the kernel builds them once: ``ptrs`` (inputs, initial and returned gradient
    sums, checkpoints, the local stage's buffers, outputs), ``carry`` (dW, db, dte, dgamma, dbeta),
    ``head`` (LN parameters and token_eta), ``pos`` (this program's offsets and masks, T, offset, NS, eps).

    PARTIAL: the segment is a trailing partial mini-batch (gradient reaches U through the returned
    gradient sum); HAS_S: segment 0, which reads the gradient sum carried in by the state. Both are
    constexpr so the [D, D] tiles they need exist only in the peeled first / last iterations.
    """
    q, k, v, lr, te, g0_w, g0_b, dgt_w, dgt_b, ckpt_w, ckpt_b, dk_f, dlr_f, dzb_f, dgl_f, dk, dv, dg0s_w, dg0s_b = ptrs  # fmt: skip
    b_dw, b_db, b_dte, b_dgamma, b_dbeta = carry
    b_gamma, b_beta, b_te, te_last = head
    i_bh64, tok0, o_i, o_d, m_d, m_dd, o_dd, T, offset, NS, eps = pos
    # CAUSAL only changes the output path (local kernel); the recurrence is the same
    o_t, m_t, b_eta, m_a, p_last, f_done = _segment_masks(n, o_i, offset, T, te, b_te, MB, BT, True)
    p_tok, m_td, b_q, b_k, b_v, b_lr = _segment_rows(q, k, v, lr, tok0, o_t, m_t, o_d, m_d, D)
    b_dzb = tl.load(dzb_f + p_tok, mask=m_td, other=0.0)
    b_dg = tl.load(dgl_f + p_tok, mask=m_td, other=0.0)
    p_ck = (i_bh64 * NS + n) * D
    b_w = tl.load(ckpt_w + p_ck * D + o_dd, mask=m_dd, other=0.0)
    b_b = tl.load(ckpt_b + p_ck + o_d, mask=m_d, other=0.0)

    b_g, b_xh, b_rstd, b_gx, b_m2 = _recompute_inner(
        b_k, b_v, b_w, b_b, b_gamma, b_beta, m_td, m_d, D, eps, PREC
    )
    b_lg = b_g * b_lr[:, None]

    # gradient reaching U = K^T (lr G), u: through the stepped anchor (full mini-batch:
    # dU = -te[b-1] dW) or, for a trailing partial mini-batch, through the returned gradient sum
    if PARTIAL:
        b_src_w = tl.load(dgt_w + i_bh64 * D * D + o_dd, mask=m_dd, other=0.0)
        b_src_b = tl.load(dgt_b + i_bh64 * D + o_d, mask=m_d, other=0.0)
        scale = te_last * 0.0 + 1.0
    else:
        b_src_w = b_dw
        b_src_b = b_db
        scale = -te_last
    b_kdx = _dot(b_k, b_src_w, PREC) + b_src_b[None, :]  # [BT, BD]
    b_dg += b_lr[:, None] * (scale * b_kdx)
    b_dlr = tl.sum(b_g * (scale * b_kdx), axis=1)
    b_dk = scale * _dot(b_lg, tl.trans(b_src_w), PREC)
    if not PARTIAL:
        # d te[b-1] from W0' = W0 - te[b-1] (S + U)
        dte_last = -tl.sum(tl.sum(b_lg * b_kdx, axis=1), axis=0)
        if HAS_S:
            b_gw = tl.load(g0_w + i_bh64 * D * D + o_dd, mask=m_dd, other=0.0)
            b_gb = tl.load(g0_b + i_bh64 * D + o_d, mask=m_d, other=0.0)
            dte_last -= tl.sum(tl.sum(b_dw * b_gw, axis=1), axis=0) + tl.sum(b_db * b_gb, axis=0)
        b_dte += tl.where(o_i == MB - 1, dte_last, 0.0)
    if HAS_S:
        tl.store(dg0s_w + i_bh64 * D * D + o_dd, scale * b_src_w, mask=m_dd)
        tl.store(dg0s_b + i_bh64 * D + o_d, scale * b_src_b, mask=m_d)

    # second-order LN-L2 backward: G(Z, v - k) -> Z, v, k, gamma, beta
    b_gz, b_dv, b_dgm, b_dbt = _ln_l2_grad_bwd(b_dg, b_g, b_xh, b_rstd, b_gx, b_m2, b_v - b_k, b_gamma, b_beta,
                                               m_td, D)  # fmt: skip
    b_dgamma += b_dgm
    b_dbeta += b_dbt
    b_dk += _dot(b_gz, tl.trans(b_w), PREC) - b_dv

    # gradient w.r.t. this segment's anchor = the previous segment's output anchor
    b_dw += _dot(tl.trans(b_q), b_dzb, PREC)
    b_dw += _dot(tl.trans(b_k), b_gz, PREC)
    b_db += tl.sum(b_dzb, axis=0) + tl.sum(b_gz, axis=0)

    b_dk += tl.load(dk_f + p_tok, mask=m_td, other=0.0)
    b_dlr += tl.load(dlr_f + tok0 + o_t, mask=m_t, other=0.0)
    tl.store(dk + p_tok, b_dk.to(dk.dtype.element_ty), mask=m_td)
    tl.store(dv + p_tok, b_dv.to(dv.dtype.element_ty), mask=m_td)
    tl.store(dlr_f + tok0 + o_t, b_dlr, mask=m_t)
    return b_dw, b_db, b_dte, b_dgamma, b_dbeta


@triton.heuristics(
    {
        "IS_VARLEN": lambda args: args["cu_seqlens"] is not None,
        "HAS_IDS": lambda args: args["ids"] is not None,
    }
)
@triton.jit(do_not_specialize=["T", "offset", "NS"])
def chunk_ttt_linear_bwd_kernel_seq(
    q, k, v, lr, te, ln_w, ln_b, ckpt_w, ckpt_b, g0_w, g0_b, dht_w, dht_b, dgt_w, dgt_b,
    dk_f, dlr_f, dzb_f, dgl_f, dk, dv, dte_s, dlnw_s, dlnb_s, dh0_w, dh0_b, dg0s_w, dg0s_b,
    cu_seqlens, ids, T, offset, NS, eps,
    H: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, MB: tl.constexpr, BT: tl.constexpr,
    PREC: tl.constexpr, LAST_PARTIAL: tl.constexpr, ONE_SEGMENT: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_IDS: tl.constexpr,
):  # fmt: skip
    # packed sequences are launched in groups sharing (LAST_PARTIAL, ONE_SEGMENT); ids maps a program
    # to its (sequence, head)
    if HAS_IDS:
        i_bh = tl.load(ids + tl.program_id(0))
    else:
        i_bh = tl.program_id(0)
    tok0, T_i, NS_i, i_bh64, o_i, o_d, m_d, b_gamma, b_beta, b_te, te_last = _program(
        i_bh, T, NS, offset, cu_seqlens, ln_w, ln_b, te, H, D, BD, MB, BT, IS_VARLEN
    )
    m_dd = m_d[:, None] & m_d[None, :]
    o_dd = o_d[:, None] * D + o_d[None, :]

    # gradient w.r.t. the anchor leaving the current segment, carried backwards
    b_dw = tl.load(dht_w + i_bh64 * D * D + o_dd, mask=m_dd, other=0.0)
    b_db = tl.load(dht_b + i_bh64 * D + o_d, mask=m_d, other=0.0)
    b_dte = tl.zeros([BT], dtype=tl.float32)
    b_dgamma = tl.zeros([BD], dtype=tl.float32)
    b_dbeta = tl.zeros([BD], dtype=tl.float32)
    ptrs = (q, k, v, lr, te, g0_w, g0_b, dgt_w, dgt_b, ckpt_w, ckpt_b, dk_f, dlr_f, dzb_f, dgl_f, dk, dv, dg0s_w,
            dg0s_b)  # fmt: skip
    head = (b_gamma, b_beta, b_te, te_last)
    pos = (i_bh64, tok0, o_i, o_d, m_d, m_dd, o_dd, T_i, offset, NS, eps)
    if ONE_SEGMENT:
        b_dw, b_db, b_dte, b_dgamma, b_dbeta = _seq_segment(
            0, ptrs, (b_dw, b_db, b_dte, b_dgamma, b_dbeta), head, pos, D, MB, BT, PREC, LAST_PARTIAL, True,
        )  # fmt: skip
    else:
        b_dw, b_db, b_dte, b_dgamma, b_dbeta = _seq_segment(
            NS_i - 1, ptrs, (b_dw, b_db, b_dte, b_dgamma, b_dbeta), head, pos, D, MB, BT, PREC, LAST_PARTIAL, False,
        )  # fmt: skip
        for i_s in range(2, NS_i):
            b_dw, b_db, b_dte, b_dgamma, b_dbeta = _seq_segment(
                NS_i - i_s, ptrs, (b_dw, b_db, b_dte, b_dgamma, b_dbeta), head, pos, D, MB, BT, PREC, False, False,
            )  # fmt: skip
        b_dw, b_db, b_dte, b_dgamma, b_dbeta = _seq_segment(
            0, ptrs, (b_dw, b_db, b_dte, b_dgamma, b_dbeta), head, pos, D, MB, BT, PREC, False, True,
        )  # fmt: skip

    tl.store(dh0_w + i_bh64 * D * D + o_dd, b_dw, mask=m_dd)
    tl.store(dh0_b + i_bh64 * D + o_d, b_db, mask=m_d)
    tl.store(dte_s + i_bh64 * MB + o_i, b_dte, mask=o_i < MB)
    tl.store(dlnw_s + i_bh64 * D + o_d, b_dgamma, mask=m_d)
    tl.store(dlnb_s + i_bh64 * D + o_d, b_dbeta, mask=m_d)


# register cap of the parallel stage at D <= 64 with bf16 dots: 4 programs per SM instead of 2 (H200: 0.33
# vs 0.47 ms at B, T, H = 8, 2048, 16; no gain at D = 128, where it stays uncapped; fp32 / tf32 dots were
# not timed with it, so they stay uncapped too). docs/kernels.md
LOCAL_MAXNREG = 128


@functools.cache
def _maxnreg_supported() -> bool:
    """Whether launches take ``maxnreg``: Triton's NVIDIA backend has it, its HIP backend rejects it."""
    if torch.version.hip is not None:
        return False
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    return "maxnreg" in {field.name for field in dataclasses.fields(CUDAOptions)}


class LocalGrads(NamedTuple):
    """What the parallel stage of the backward leaves for the sequential one (fp32 unless noted).

    dq [B, H, T, D] (dtype of q, complete); dk, dlr: the output-path parts of dk [B, H, T, D] and dlr
    [B, H, T]; dzb = dLoss/dZbar and dgl = dLoss/dG through the output path only, [B, H, T, D];
    dte, dln_w, dln_b: per-segment partials [N, H, NS, b] / [N, H, NS, D]; dg0: the output-path gradient
    of the carried gradient sum (W [N, H, D, D], b [N, H, D]); N = B, or the number of packed sequences.
    """

    dq: torch.Tensor
    dk: torch.Tensor
    dlr: torch.Tensor
    dzb: torch.Tensor
    dgl: torch.Tensor
    dte: torch.Tensor
    dln_w: torch.Tensor
    dln_b: torch.Tensor
    dg0: tuple[torch.Tensor, torch.Tensor]


def chunk_ttt_linear_bwd_local(
    q, k, v, lr, token_eta, ln_weight, ln_bias, ckpt, g0, do, *, offset, causal, eps, cu_seqlens=None,
    num_warps=None, maxnreg=None,
) -> LocalGrads:  # fmt: skip
    """Launch the parallel stage of the backward (one program per (segment, sequence, head)): every
    gradient of the output path, from the anchors the forward checkpointed (``ckpt``). Arguments as
    ``chunk_ttt_linear_bwd``; ``maxnreg``: cap on registers per thread (more programs per SM)."""
    Bq, H, T, D = q.shape
    MB = token_eta.shape[0]
    B, NS, _ = varlen_plan(cu_seqlens, offset, MB, Bq, T)
    cfg = launch_config(D, q.dtype, checkpoint_precision(q.dtype, ckpt[0].dtype))
    if maxnreg is None and q.is_cuda and cfg["BD"] <= 64 and cfg["PREC"] == "bf16" and _maxnreg_supported():
        maxnreg = LOCAL_MAXNREG
    rows = lambda *shape: q.new_empty(*shape, dtype=torch.float32)  # noqa: E731
    out = LocalGrads(
        dq=torch.empty_like(q), dk=rows(Bq, H, T, D), dlr=rows(Bq, H, T), dzb=rows(Bq, H, T, D),
        dgl=rows(Bq, H, T, D), dte=rows(B, H, NS, MB), dln_w=rows(B, H, NS, D), dln_b=rows(B, H, NS, D),
        dg0=(torch.empty_like(g0[0]), torch.empty_like(g0[1])),
    )  # fmt: skip
    chunk_ttt_linear_bwd_kernel_local[(NS, B * H)](
        q, k, v, lr, token_eta, ln_weight, ln_bias, ckpt[0], ckpt[1], g0[0], g0[1], do,
        out.dq, out.dk, out.dlr, out.dzb, out.dgl, out.dte, out.dln_w, out.dln_b, *out.dg0, cu_seqlens,
        T, offset, NS, eps, H=H, D=D, BD=cfg["BD"], MB=MB, BT=max(16, triton.next_power_of_2(MB)),
        PREC=cfg["PREC"], CAUSAL=causal, num_warps=num_warps or (4 if cfg["BD"] <= 64 else 8),
        **({"maxnreg": maxnreg} if maxnreg else {}),
    )  # fmt: skip
    return out


def chunk_ttt_linear_bwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lr: torch.Tensor,
    token_eta: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    ckpt: tuple[torch.Tensor, torch.Tensor],
    g0: tuple[torch.Tensor, torch.Tensor],
    do: torch.Tensor,
    dht: tuple[torch.Tensor, torch.Tensor],
    dgt: tuple[torch.Tensor, torch.Tensor],
    *,
    offset: int,
    causal: bool,
    eps: float,
    cu_seqlens: torch.Tensor | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
):
    """Launch the backward. Returns dq, dk, dv (dtype of q), dlr [B, H, T] fp32, dte [b] fp32,
    dln_w, dln_b [H, D] fp32, (dW0, db0) and (dgW0, dgb0) for the initial anchor and gradient sum.

    Temporary memory: three fp32 [B, H, T, D] buffers (dZb, dG_local, partial dk) and small partials."""
    Bq, H, T, D = q.shape
    MB = token_eta.shape[0]
    B, NS, lens = varlen_plan(cu_seqlens, offset, MB, Bq, T)
    cfg = launch_config(D, q.dtype, checkpoint_precision(q.dtype, ckpt[0].dtype))
    loc = chunk_ttt_linear_bwd_local(
        q, k, v, lr, token_eta, ln_weight, ln_bias, ckpt, g0, do, offset=offset, causal=causal, eps=eps,
        cu_seqlens=cu_seqlens,
    )  # fmt: skip
    f32 = dict(dtype=torch.float32)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    dte_s = q.new_empty(B, H, MB, **f32)
    dlnw_s, dlnb_s = q.new_empty(B, H, D, **f32), q.new_empty(B, H, D, **f32)
    dh0_w, dh0_b = torch.empty_like(g0[0]), torch.empty_like(g0[1])
    dg0s_w, dg0s_b = torch.empty_like(g0[0]), torch.empty_like(g0[1])
    meta = dict(H=H, D=D, BD=cfg["BD"], MB=MB, BT=max(16, triton.next_power_of_2(MB)), PREC=cfg["PREC"])
    # the sequential kernel peels its first / last segments with constexpr flags: packed sequences are
    # launched in groups that share them
    groups = {}
    for n, t in enumerate(lens or [T] * B):
        flags = ((offset + t) % MB != 0, triton.cdiv(offset + t, MB) == 1)
        groups.setdefault(flags, []).extend(n * H + h for h in range(H))
    for (last_partial, one_segment), members in groups.items():
        ids = None if len(groups) == 1 else torch.tensor(members, dtype=torch.int32, device=q.device)
        chunk_ttt_linear_bwd_kernel_seq[(len(members),)](
            q, k, v, lr, token_eta, ln_weight, ln_bias, ckpt[0], ckpt[1], g0[0], g0[1],
            dht[0], dht[1], dgt[0], dgt[1], loc.dk, loc.dlr, loc.dzb, loc.dgl,
            dk, dv, dte_s, dlnw_s, dlnb_s, dh0_w, dh0_b, dg0s_w, dg0s_b, cu_seqlens, ids,
            T, offset, NS, eps, LAST_PARTIAL=last_partial, ONE_SEGMENT=one_segment,
            num_warps=num_warps or cfg["num_warps_bwd"], num_stages=num_stages or cfg["num_stages"], **meta,
        )  # fmt: skip
    dte = loc.dte.sum((0, 1, 2)) + dte_s.sum((0, 1))
    dln_w = loc.dln_w.sum((0, 2)) + dlnw_s.sum(0)
    dln_b = loc.dln_b.sum((0, 2)) + dlnb_s.sum(0)
    dg0 = (loc.dg0[0] + dg0s_w, loc.dg0[1] + dg0s_b)
    return loc.dq, dk, dv, loc.dlr, dte, dln_w, dln_b, (dh0_w, dh0_b), dg0
