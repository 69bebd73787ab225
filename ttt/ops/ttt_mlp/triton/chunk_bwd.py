"""Backward of TTT-MLP in two launches: a parallel per-segment pass, then the sequential recurrence.

Dims as in ``chunk_fwd.py``: D head dim (BD padded), M hidden width, walked in tiles of BMT columns
(NMT tiles; a [D, M] tile of the weights never lives in registers whole), b mini-batch (BT rows). Each
segment is recomputed from the anchor the forward checkpointed at its start. The derivation of every
line is in ``../README.md``; in short (E[i, j] = eta_i lr_j on the causal / segment mask):

    Z1 = K W1 + b1, X2 = gelu(Z1), Z2 = X2 W2 + b2, G2 = LN-L2 grad(Z2), P1 = G2 W2^T, G1 = P1 * gelu'(Z1)
    Z1b = Q W1 + b1 - eta (Q S1 + s1) - (E * (Q K^T + 1)) G1,  X2b = gelu(Z1b)
    Z2b = X2b W2 + b2 - eta (X2b S2 + s2) - (E * (X2b X2^T + 1)) G2,  o = Q + LN(Z2b)
    U1 = K^T (lr G1), u1 = sum lr G1, U2 = X2^T (lr G2), u2 = sum lr G2
    full mini-batch: anchor' = anchor - te[b-1] (S + U);  trailing partial: anchor' = anchor, S' = S + U

(the non-causal form is the same with E[i, j] = te[last] lr_j on every column of the segment).

1. ``chunk_ttt_mlp_bwd_kernel_local`` (grid NS x B*H, launched once for segment 0, which reads the
   carried gradient sums, and once for the others): the output path. dZ2b through the output LN, dq
   (complete), the output-path parts of dk, dlr, d token_eta, d LN params, d(carried sums), and into fp32
   buffers: X2b, dZ1b [T, M], dZ2b [T, D] (for the anchor gradient Q^T dZ1b + X2b^T dZ2b) and the local
   gradients w.r.t. the inner quantities dG1_loc = -A1^T dZ1b, dX2_loc = dP2^T X2b [T, M],
   dG2_loc = -A2^T dZ2b [T, D].
2. ``chunk_ttt_mlp_bwd_kernel_seq`` (grid B*H): segments in reverse, carrying d(anchor) = (dW1, db1, dW2)
   in the fp32 output buffers themselves (updated in place, tile by tile) and db2 in registers; per
   segment three passes over the M tiles: (A) Z2 and X2 dU2, (B) the gradient through U, G1 and gelu'
   (gelu''), (C) after the second-order LN-L2 backward, the gradient through Z2 and Z1 into dk and the
   carried anchor gradient.

Packed sequences (``cu_seqlens``): both kernels run one program per (sequence, head). The local kernel's
grid covers the most segments of any sequence; a segment past a short sequence's end has every row masked
and reads that sequence's last checkpoint, so its partials are zeros. The sequential kernel is launched
once per group of sequences sharing its peeled-segment flags (LAST_PARTIAL, ONE_SEGMENT), with ``ids``
mapping programs to (sequence, head).
"""

from __future__ import annotations

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
from .chunk_fwd import _gelu_tanh, _load_w_tile

# widest M tile (columns of W1 / rows of W2) a kernel holds in registers, and the warps per program.
# Static sm_90 builds (triton 3.9, D = 64, M = 256, bf16) spill the least with 32-column tiles at 8 warps
# (local / sequential kernel: 336 / 248 bytes of stack per thread, against 1064 / 384 with 64 columns);
# not timed on a GPU. Tests lower MAX_BLOCK_M to cover more tiles.
MAX_BLOCK_M = 32
NUM_WARPS = 8


@triton.jit
def _gelu_tanh_d2(x):
    """gelu(x), gelu'(x), gelu''(x) of the tanh approximation u = c (x + a x^3), gelu = x (1 + tanh u) / 2.

    gelu'' = (1 - t^2) (u' + x (u'' / 2 - t u'^2)) with t = tanh u, u' = c (1 + 3 a x^2), u'' = 6 c a x.
    """
    c = 0.7978845608028654
    a = 0.044715
    t = 2.0 * tl.sigmoid(2.0 * c * (x + a * x * x * x)) - 1.0
    du = c * (1.0 + 3.0 * a * x * x)
    s = 1.0 - t * t
    return (
        0.5 * x * (1.0 + t),
        0.5 * (1.0 + t) + 0.5 * x * s * du,
        s * (du + x * (3.0 * c * a * x - t * du * du)),
    )


@triton.jit
def _inner_z2(b_k, w1, b1, w2, o_d, o_j, m_d, D: tl.constexpr, M: tl.constexpr, BT: tl.constexpr,
              BD: tl.constexpr, BMT: tl.constexpr, NMT: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    """Z2 - b2 = gelu(K W1 + b1) W2 over all M tiles. [BT, BD]"""
    b_z2 = tl.zeros([BT, BD], dtype=tl.float32)
    for i_m in range(NMT):
        o_m = i_m * BMT + o_j
        b_w1, b_b1, b_w2 = _load_w_tile(w1, b1, w2, o_d, o_m, m_d, o_m < M, D, M)
        b_x2 = _gelu_tanh(_dot(b_k, b_w1, PREC) + b_b1[None, :])[0]
        b_z2 += _dot(b_x2, b_w2, PREC)
    return b_z2


@triton.heuristics({"IS_VARLEN": lambda args: args["cu_seqlens"] is not None})
@triton.jit(do_not_specialize=["T", "offset", "NS", "N0"])
def chunk_ttt_mlp_bwd_kernel_local(
    q, k, v, lr, te, ln_w, ln_b, ckpt_w1, ckpt_b1, ckpt_w2, ckpt_b2, g0_w1, g0_b1, g0_w2, g0_b2, do,
    dq, dk_f, dlr_f, x2b_f, dz1b_f, dg1l_f, dx2l_f, dz2b_f, dg2l_f, dte_p, dlnw_p, dlnb_p,
    dg0l_w1, dg0l_b1, dg0l_w2, dg0l_b2, cu_seqlens, T, offset, NS, N0, eps,
    H: tl.constexpr, D: tl.constexpr, M: tl.constexpr, BD: tl.constexpr, BMT: tl.constexpr,
    NMT: tl.constexpr, MB: tl.constexpr, BT: tl.constexpr, CAUSAL: tl.constexpr, PREC: tl.constexpr,
    HAS_S: tl.constexpr, IS_VARLEN: tl.constexpr,
):  # fmt: skip
    """Output path of segment N0 + program_id(0); HAS_S: the segment reads the carried gradient sums."""
    n, i_bh = tl.program_id(0) + N0, tl.program_id(1)
    tok0, T_i, NS_i, i_bh64, o_i, o_d, m_d, b_gamma, b_beta, b_te, te_last = _program(
        i_bh, T, NS, offset, cu_seqlens, ln_w, ln_b, te, H, D, BD, MB, BT, IS_VARLEN
    )
    o_j = tl.arange(0, BMT)

    o_t, m_t, b_eta, m_a, p_last, f_done = _segment_masks(n, o_i, offset, T_i, te, b_te, MB, BT, CAUSAL)
    p_tok, m_td, b_q, b_k, b_v, b_lr = _segment_rows(q, k, v, lr, tok0, o_t, m_t, o_d, m_d, D)
    p_tm = tok0 * M + o_t[:, None] * M
    b_do = tl.load(do + p_tok, mask=m_td, other=0.0).to(tl.float32)
    p_ck = i_bh64 * NS + n
    p_w = p_ck
    if IS_VARLEN:
        # segments past the end of a short packed sequence were never checkpointed: they read the last
        # one (finite; their rows are all masked, so every partial they write is zero)
        p_w = i_bh64 * NS + tl.minimum(n, NS_i - 1)
    w1, b1, w2 = ckpt_w1 + p_w * D * M, ckpt_b1 + p_w * M, ckpt_w2 + p_w * M * D
    s1, sb1, s2 = g0_w1 + i_bh64 * D * M, g0_b1 + i_bh64 * M, g0_w2 + i_bh64 * M * D
    b_b2 = tl.load(ckpt_b2 + p_w * D + o_d, mask=m_d, other=0.0)

    # inner gradient G2 at the anchor (needs Z2, a sum over all M tiles)
    b_z2 = _inner_z2(b_k, w1, b1, w2, o_d, o_j, m_d, D, M, BT, BD, BMT, NMT, PREC) + b_b2[None, :]
    b_g2 = _ln_l2_grad(b_z2, b_v - b_k, b_gamma, b_beta, m_td, m_d, D, eps)[0]
    b_qk = _dot(b_q, tl.trans(b_k), PREC)
    b_a1 = tl.where(m_a, b_eta[:, None] * b_lr[None, :] * (b_qk + 1.0), 0.0)

    # forward of the output path: Z1b, X2b per tile; Z2b and P2 = X2b X2^T summed over tiles
    b_z2b = tl.zeros([BT, BD], dtype=tl.float32)
    b_zs2 = tl.zeros([BT, BD], dtype=tl.float32)
    b_p2 = tl.zeros([BT, BT], dtype=tl.float32)
    for i_m in range(NMT):
        o_m = i_m * BMT + o_j
        m_m = o_m < M
        b_w1, b_b1, b_w2 = _load_w_tile(w1, b1, w2, o_d, o_m, m_d, m_m, D, M)
        b_x2, b_dg = _gelu_tanh(_dot(b_k, b_w1, PREC) + b_b1[None, :])
        b_g1 = _dot(b_g2, tl.trans(b_w2), PREC) * b_dg
        b_z1b = _dot(b_q, b_w1, PREC) + b_b1[None, :]
        b_z1b -= _dot(b_a1, b_g1, PREC)
        if HAS_S:
            b_s1, b_sb1, b_s2 = _load_w_tile(s1, sb1, s2, o_d, o_m, m_d, m_m, D, M)
            b_z1b -= b_eta[:, None] * (_dot(b_q, b_s1, PREC) + b_sb1[None, :])
        b_x2b = _gelu_tanh(b_z1b)[0]
        tl.store(x2b_f + p_tm + o_m[None, :], b_x2b, mask=m_t[:, None] & m_m[None, :])
        b_z2b += _dot(b_x2b, b_w2, PREC)
        b_p2 += _dot(b_x2b, tl.trans(b_x2), PREC)
        if HAS_S:
            b_zs2 += _dot(b_x2b, b_s2, PREC)
    if HAS_S:
        b_zs2 += tl.load(g0_b2 + i_bh64 * D + o_d, mask=m_d, other=0.0)[None, :]
    b_a2 = tl.where(m_a, b_eta[:, None] * b_lr[None, :] * (b_p2 + 1.0), 0.0)
    b_z2b += b_b2[None, :] - _dot(b_a2, b_g2, PREC) - b_eta[:, None] * b_zs2
    b_xb, b_rstdb = _ln_rows(b_z2b, m_d, D, eps)

    # output LayerNorm
    tl.store(dlnw_p + p_ck * D + o_d, tl.sum(b_do * b_xb, axis=0), mask=m_d)
    tl.store(dlnb_p + p_ck * D + o_d, tl.sum(b_do, axis=0), mask=m_d)
    b_dz2b = tl.where(m_td, _ln_rows_bwd(b_do * b_gamma[None, :], b_xb, b_rstdb, D), 0.0)
    tl.store(dz2b_f + p_tok, b_dz2b, mask=m_td)
    b_edz2 = b_eta[:, None] * b_dz2b

    # Z2b's intra-segment term -(E * (X2b X2^T + 1)) G2
    b_da2 = -_dot(b_dz2b, tl.trans(b_g2), PREC)  # [BT, BT]
    b_dp2 = tl.where(m_a, b_da2 * b_eta[:, None] * b_lr[None, :], 0.0)
    b_dem = tl.where(m_a, b_da2 * (b_p2 + 1.0), 0.0)
    b_deta = tl.sum(b_dem * b_lr[None, :], axis=1) - tl.sum(b_dz2b * b_zs2, axis=1)
    b_dlr = tl.sum(b_dem * b_eta[:, None], axis=0)
    tl.store(dg2l_f + p_tok, -_dot(tl.trans(b_a2), b_dz2b, PREC), mask=m_td)
    if HAS_S:
        tl.store(dg0l_b2 + i_bh64 * D + o_d, -tl.sum(b_edz2, axis=0), mask=m_d)

    # backward of the output path per tile: X2b -> Z1b -> Q, A1, the carried sums
    b_dq = b_do
    b_da1 = tl.zeros([BT, BT], dtype=tl.float32)
    for i_m in range(NMT):
        o_m = i_m * BMT + o_j
        m_m = o_m < M
        m_tm = m_t[:, None] & m_m[None, :]
        b_w1, b_b1, b_w2 = _load_w_tile(w1, b1, w2, o_d, o_m, m_d, m_m, D, M)
        b_x2, b_dg = _gelu_tanh(_dot(b_k, b_w1, PREC) + b_b1[None, :])
        b_g1 = _dot(b_g2, tl.trans(b_w2), PREC) * b_dg
        b_dx2b = _dot(b_dz2b, tl.trans(b_w2), PREC)
        b_dx2b += _dot(b_dp2, b_x2, PREC)
        # X2b of this tile: the buffer holds it, but recomputing it needs no barrier between threads
        b_z1b = _dot(b_q, b_w1, PREC) + b_b1[None, :]
        b_z1b -= _dot(b_a1, b_g1, PREC)
        if HAS_S:
            b_s1, b_sb1, b_s2 = _load_w_tile(s1, sb1, s2, o_d, o_m, m_d, m_m, D, M)
            b_zs1 = _dot(b_q, b_s1, PREC) + b_sb1[None, :]
            b_z1b -= b_eta[:, None] * b_zs1
            b_dx2b -= _dot(b_edz2, tl.trans(b_s2), PREC)
        b_x2b, b_dgb = _gelu_tanh(b_z1b)
        b_dz1b = b_dx2b * b_dgb
        tl.store(dx2l_f + p_tm + o_m[None, :], _dot(tl.trans(b_dp2), b_x2b, PREC), mask=m_tm)
        tl.store(dz1b_f + p_tm + o_m[None, :], b_dz1b, mask=m_tm)
        tl.store(dg1l_f + p_tm + o_m[None, :], -_dot(tl.trans(b_a1), b_dz1b, PREC), mask=m_tm)
        b_da1 -= _dot(b_dz1b, tl.trans(b_g1), PREC)
        b_dq += _dot(b_dz1b, tl.trans(b_w1), PREC)
        if HAS_S:
            b_edz1 = b_eta[:, None] * b_dz1b
            b_dq -= _dot(b_edz1, tl.trans(b_s1), PREC)
            b_deta -= tl.sum(b_dz1b * b_zs1, axis=1)
            b_ds1 = -_dot(tl.trans(b_q), b_edz1, PREC)  # [BD, BMT]
            b_ds2 = -_dot(tl.trans(b_x2b), b_edz2, PREC)  # [BMT, BD]
            p_dm = i_bh64 * D * M + o_d[:, None] * M + o_m[None, :]
            p_md = i_bh64 * M * D + o_m[:, None] * D + o_d[None, :]
            tl.store(dg0l_w1 + p_dm, b_ds1, mask=m_d[:, None] & m_m[None, :])
            tl.store(dg0l_b1 + i_bh64 * M + o_m, -tl.sum(b_edz1, axis=0), mask=m_m)
            tl.store(dg0l_w2 + p_md, b_ds2, mask=m_m[:, None] & m_d[None, :])

    # Z1b's intra-segment term -(E * (Q K^T + 1)) G1
    b_dp1 = tl.where(m_a, b_da1 * b_eta[:, None] * b_lr[None, :], 0.0)
    b_dem = tl.where(m_a, b_da1 * (b_qk + 1.0), 0.0)
    b_deta += tl.sum(b_dem * b_lr[None, :], axis=1)
    b_dlr += tl.sum(b_dem * b_eta[:, None], axis=0)
    b_dq += _dot(b_dp1, b_k, PREC)
    tl.store(dq + p_tok, b_dq.to(dq.dtype.element_ty), mask=m_td)
    tl.store(dk_f + p_tok, _dot(tl.trans(b_dp1), b_q, PREC), mask=m_td)
    tl.store(dlr_f + tok0 + o_t, b_dlr, mask=m_t)
    if CAUSAL:
        b_dte = tl.where(m_t, b_deta, 0.0)
    else:
        # every row used te[last]
        b_dte = tl.where(o_i == p_last, tl.sum(tl.where(m_t, b_deta, 0.0), axis=0), 0.0)
    tl.store(dte_p + p_ck * MB + o_i, b_dte, mask=o_i < MB)


@triton.jit
def _seq_segment(
    n, ptrs, carry, head, pos,
    D: tl.constexpr, M: tl.constexpr, BD: tl.constexpr, BMT: tl.constexpr, NMT: tl.constexpr,
    MB: tl.constexpr, BT: tl.constexpr, PREC: tl.constexpr, PARTIAL: tl.constexpr, HAS_S: tl.constexpr,
):  # fmt: skip
    """Segment n of the reverse sweep; returns the carried (db2, dte, dgamma, dbeta).

    Arguments bundled as the kernel builds them once: ``ptrs`` (inputs, checkpoints, initial and returned
    gradient sums, the local stage's buffers, outputs, carried anchor gradient, gradient-sum outputs),
    ``carry`` (db2, dte, dgamma, dbeta), ``head`` (LN parameters and token_eta), ``pos`` (this program's
    offsets and masks, T, offset, NS, eps).

    On entry dh_w1 / dh_b1 / dh_w2 hold the gradient w.r.t. the anchor leaving segment n; on exit, w.r.t.
    the anchor entering it. PARTIAL: a trailing partial mini-batch (U reached through the returned gradient
    sums); HAS_S: segment 0, which reads the carried gradient sums.
    """
    (q, k, v, lr, ckpt_w1, ckpt_b1, ckpt_w2, ckpt_b2, g0_w1, g0_b1, g0_w2, g0_b2, dgt_w1, dgt_b1, dgt_w2,
     dgt_b2, dk_f, dlr_f, x2b_f, dz1b_f, dg1l_f, dx2l_f, dz2b_f, dg2l_f, dk, dv, dh_w1, dh_b1, dh_w2,
     dg0s_w1, dg0s_b1, dg0s_w2, dg0s_b2) = ptrs  # fmt: skip
    b_db2, b_dte, b_dgamma, b_dbeta = carry
    b_gamma, b_beta, b_te, te, te_last = head
    i_bh64, tok0, o_i, o_d, o_j, m_d, T, offset, NS, eps = pos
    # causal or not only changes the output path (local kernel): the recurrence is the same
    o_t, m_t, b_eta, m_a, p_last, f_done = _segment_masks(n, o_i, offset, T, te, b_te, MB, BT, True)
    p_tok, m_td, b_q, b_k, b_v, b_lr = _segment_rows(q, k, v, lr, tok0, o_t, m_t, o_d, m_d, D)
    p_tm = tok0 * M + o_t[:, None] * M
    b_dz2b = tl.load(dz2b_f + p_tok, mask=m_td, other=0.0)
    p_ck = i_bh64 * NS + n
    w1, b1, w2 = ckpt_w1 + p_ck * D * M, ckpt_b1 + p_ck * M, ckpt_w2 + p_ck * M * D
    b_b2 = tl.load(ckpt_b2 + p_ck * D + o_d, mask=m_d, other=0.0)
    # U reached through the stepped anchor (full mini-batch: dU = -te[b-1] d anchor') or through the
    # returned gradient sums (trailing partial mini-batch: dU = dS')
    if PARTIAL:
        src_w1, src_b1, src_w2 = dgt_w1 + i_bh64 * D * M, dgt_b1 + i_bh64 * M, dgt_w2 + i_bh64 * M * D
        b_src_b2 = tl.load(dgt_b2 + i_bh64 * D + o_d, mask=m_d, other=0.0)
        scale = te_last * 0.0 + 1.0
    else:
        src_w1, src_b1, src_w2 = dh_w1, dh_b1, dh_w2
        b_src_b2 = b_db2
        scale = -te_last
    # the previous segment's in-place updates of dh_* are visible to every thread
    tl.debug_barrier()

    # (A) Z2 = X2 W2 + b2 and X2 dU2 / scale, both sums over the M tiles
    b_z2 = tl.zeros([BT, BD], dtype=tl.float32)
    b_xdx2 = tl.zeros([BT, BD], dtype=tl.float32)
    for i_m in range(NMT):
        o_m = i_m * BMT + o_j
        m_m = o_m < M
        b_w1, b_b1, b_w2 = _load_w_tile(w1, b1, w2, o_d, o_m, m_d, m_m, D, M)
        b_sw2 = tl.load(src_w2 + o_m[:, None] * D + o_d[None, :], mask=m_m[:, None] & m_d[None, :], other=0.0)
        b_x2 = _gelu_tanh(_dot(b_k, b_w1, PREC) + b_b1[None, :])[0]
        b_z2 += _dot(b_x2, b_w2, PREC)
        b_xdx2 += _dot(b_x2, b_sw2, PREC)
    b_z2 += b_b2[None, :]
    b_xdx2 += b_src_b2[None, :]
    b_tgt = b_v - b_k
    b_g2, b_xh, b_rstd, b_gx, b_m2 = _ln_l2_grad(b_z2, b_tgt, b_gamma, b_beta, m_td, m_d, D, eps)
    b_lg2 = b_g2 * b_lr[:, None]
    # dG2 = local + lr dLG2 (+ dP1 W2 below), dLG2 = X2 dU2 + du2
    b_dg2 = tl.load(dg2l_f + p_tok, mask=m_td, other=0.0) + b_lr[:, None] * (scale * b_xdx2)
    b_dlr = tl.sum(b_g2 * (scale * b_xdx2), axis=1)
    # d te[b-1] from anchor' = anchor - te[b-1] (S + U): -<d anchor', U> (+ -<d anchor', S> below)
    dte_last = -tl.sum(tl.sum(b_lg2 * b_xdx2, axis=1), axis=0)
    if HAS_S:
        b_s2b = tl.load(g0_b2 + i_bh64 * D + o_d, mask=m_d, other=0.0)
        dte_last -= tl.sum(b_src_b2 * b_s2b, axis=0)
        tl.store(dg0s_b2 + i_bh64 * D + o_d, scale * b_src_b2, mask=m_d)

    # (B) through U1 = K^T (lr G1), U2's X2 factor, G1 = (G2 W2^T) gelu'(Z1); dZ1 without its Z2 part
    # goes to the dG1_loc rows of this segment, dW2 gets dP1^T G2 + X2b^T dZ2b
    b_dk = tl.zeros([BT, BD], dtype=tl.float32)
    for i_m in range(NMT):
        o_m = i_m * BMT + o_j
        m_m = o_m < M
        m_tm = m_t[:, None] & m_m[None, :]
        m_md = m_m[:, None] & m_d[None, :]
        p_md = o_m[:, None] * D + o_d[None, :]
        b_w1, b_b1, b_w2 = _load_w_tile(w1, b1, w2, o_d, o_m, m_d, m_m, D, M)
        b_sw1, b_sb1, b_sw2 = _load_w_tile(src_w1, src_b1, src_w2, o_d, o_m, m_d, m_m, D, M)
        b_dw2 = tl.load(dh_w2 + p_md, mask=m_md, other=0.0)
        b_dg1 = tl.load(dg1l_f + p_tm + o_m[None, :], mask=m_tm, other=0.0)
        b_dx2 = tl.load(dx2l_f + p_tm + o_m[None, :], mask=m_tm, other=0.0)
        b_x2b = tl.load(x2b_f + p_tm + o_m[None, :], mask=m_tm, other=0.0)
        b_x2, b_d1, b_d2 = _gelu_tanh_d2(_dot(b_k, b_w1, PREC) + b_b1[None, :])
        b_p1 = _dot(b_g2, tl.trans(b_w2), PREC)
        b_g1 = b_p1 * b_d1
        b_lg1 = b_g1 * b_lr[:, None]
        b_kdx1 = _dot(b_k, b_sw1, PREC) + b_sb1[None, :]
        b_dk += scale * _dot(b_lg1, tl.trans(b_sw1), PREC)
        b_dlr += tl.sum(b_g1 * (scale * b_kdx1), axis=1)
        dte_last -= tl.sum(tl.sum(b_lg1 * b_kdx1, axis=1), axis=0)
        b_dg1 += b_lr[:, None] * (scale * b_kdx1)
        b_dx2 += scale * _dot(b_lg2, tl.trans(b_sw2), PREC)
        b_dp1 = b_dg1 * b_d1
        b_dz1 = b_dg1 * b_p1 * b_d2 + b_dx2 * b_d1
        b_dg2 += _dot(b_dp1, b_w2, PREC)
        b_dw2 += _dot(tl.trans(b_dp1), b_g2, PREC)
        b_dw2 += _dot(tl.trans(b_x2b), b_dz2b, PREC)
        if HAS_S:
            s1, sb1, s2 = g0_w1 + i_bh64 * D * M, g0_b1 + i_bh64 * M, g0_w2 + i_bh64 * M * D
            b_s1, b_s1b, b_s2 = _load_w_tile(s1, sb1, s2, o_d, o_m, m_d, m_m, D, M)
            dte_last -= tl.sum(tl.sum(b_sw1 * b_s1, axis=1), axis=0) + tl.sum(b_sb1 * b_s1b, axis=0)
            dte_last -= tl.sum(tl.sum(b_sw2 * b_s2, axis=1), axis=0)
            p_dm = i_bh64 * D * M + o_d[:, None] * M + o_m[None, :]
            tl.store(dg0s_w1 + p_dm, scale * b_sw1, mask=m_d[:, None] & m_m[None, :])
            tl.store(dg0s_b1 + i_bh64 * M + o_m, scale * b_sb1, mask=m_m)
            tl.store(dg0s_w2 + i_bh64 * M * D + p_md, scale * b_sw2, mask=m_md)
        # every thread has read this tile of dh_w2 / dG1_loc before any overwrites it
        tl.debug_barrier()
        tl.store(dh_w2 + p_md, b_dw2, mask=m_md)
        tl.store(dg1l_f + p_tm + o_m[None, :], b_dz1, mask=m_tm)
    tl.debug_barrier()

    # second-order LN-L2 backward: G2(Z2, v - k) -> Z2, v, k, gamma, beta
    b_dz2, b_dtgt, dgamma, dbeta = _ln_l2_grad_bwd(
        b_dg2, b_g2, b_xh, b_rstd, b_gx, b_m2, b_tgt, b_gamma, b_beta, m_td, D
    )
    b_dgamma += dgamma
    b_dbeta += dbeta
    b_dk -= b_dtgt

    # (C) through Z2 = X2 W2 + b2 and Z1 = K W1 + b1; the anchor gradient gets K^T dZ1 + Q^T dZ1b
    for i_m in range(NMT):
        o_m = i_m * BMT + o_j
        m_m = o_m < M
        m_tm = m_t[:, None] & m_m[None, :]
        m_dm = m_d[:, None] & m_m[None, :]
        m_md = m_m[:, None] & m_d[None, :]
        p_dm = o_d[:, None] * M + o_m[None, :]
        p_md = o_m[:, None] * D + o_d[None, :]
        b_w1, b_b1, b_w2 = _load_w_tile(w1, b1, w2, o_d, o_m, m_d, m_m, D, M)
        b_dw1, b_db1, b_dw2 = _load_w_tile(dh_w1, dh_b1, dh_w2, o_d, o_m, m_d, m_m, D, M)
        b_dz1 = tl.load(dg1l_f + p_tm + o_m[None, :], mask=m_tm, other=0.0)
        b_dz1b = tl.load(dz1b_f + p_tm + o_m[None, :], mask=m_tm, other=0.0)
        b_x2, b_d1 = _gelu_tanh(_dot(b_k, b_w1, PREC) + b_b1[None, :])
        b_dz1 += _dot(b_dz2, tl.trans(b_w2), PREC) * b_d1
        b_dz1 = tl.where(m_tm, b_dz1, 0.0)
        b_dk += _dot(b_dz1, tl.trans(b_w1), PREC)
        b_dw1 += _dot(tl.trans(b_q), b_dz1b, PREC)
        b_dw1 += _dot(tl.trans(b_k), b_dz1, PREC)
        b_db1 += tl.sum(b_dz1b, axis=0) + tl.sum(b_dz1, axis=0)
        b_dw2 += _dot(tl.trans(b_x2), b_dz2, PREC)
        tl.debug_barrier()
        tl.store(dh_w1 + p_dm, b_dw1, mask=m_dm)
        tl.store(dh_b1 + o_m, b_db1, mask=m_m)
        tl.store(dh_w2 + p_md, b_dw2, mask=m_md)
    b_db2 += tl.sum(b_dz2b, axis=0) + tl.sum(b_dz2, axis=0)

    b_dk += tl.load(dk_f + p_tok, mask=m_td, other=0.0)
    b_dlr += tl.load(dlr_f + tok0 + o_t, mask=m_t, other=0.0)
    tl.store(dk + p_tok, b_dk.to(dk.dtype.element_ty), mask=m_td)
    tl.store(dv + p_tok, b_dtgt.to(dv.dtype.element_ty), mask=m_td)
    tl.store(dlr_f + tok0 + o_t, b_dlr, mask=m_t)
    if not PARTIAL:
        b_dte += tl.where(o_i == MB - 1, dte_last, 0.0)
    return b_db2, b_dte, b_dgamma, b_dbeta


@triton.heuristics(
    {
        "IS_VARLEN": lambda args: args["cu_seqlens"] is not None,
        "HAS_IDS": lambda args: args["ids"] is not None,
    }
)
@triton.jit(do_not_specialize=["T", "offset", "NS"])
def chunk_ttt_mlp_bwd_kernel_seq(
    q, k, v, lr, te, ln_w, ln_b, ckpt_w1, ckpt_b1, ckpt_w2, ckpt_b2, g0_w1, g0_b1, g0_w2, g0_b2,
    dht_b2, dgt_w1, dgt_b1, dgt_w2, dgt_b2, dk_f, dlr_f, x2b_f, dz1b_f, dg1l_f, dx2l_f, dz2b_f, dg2l_f,
    dk, dv, dte_s, dlnw_s, dlnb_s, dh_w1, dh_b1, dh_w2, dh_b2, dg0s_w1, dg0s_b1, dg0s_w2, dg0s_b2,
    cu_seqlens, ids, T, offset, NS, eps,
    H: tl.constexpr, D: tl.constexpr, M: tl.constexpr, BD: tl.constexpr, BMT: tl.constexpr,
    NMT: tl.constexpr, MB: tl.constexpr, BT: tl.constexpr, PREC: tl.constexpr,
    LAST_PARTIAL: tl.constexpr, ONE_SEGMENT: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_IDS: tl.constexpr,
):  # fmt: skip
    """Reverse sweep for one (batch, head). dh_w1 / dh_b1 / dh_w2 must hold d(final anchor) on entry.

    Packed sequences are launched in groups sharing (LAST_PARTIAL, ONE_SEGMENT); ``ids`` maps a program to
    its (sequence, head).
    """
    if HAS_IDS:
        i_bh = tl.load(ids + tl.program_id(0))
    else:
        i_bh = tl.program_id(0)
    tok0, T_i, NS_i, i_bh64, o_i, o_d, m_d, b_gamma, b_beta, b_te, te_last = _program(
        i_bh, T, NS, offset, cu_seqlens, ln_w, ln_b, te, H, D, BD, MB, BT, IS_VARLEN
    )
    o_j = tl.arange(0, BMT)
    # this program's slices of the carried anchor gradient (updated in place) and of the sums' inputs
    dh_w1 += i_bh64 * D * M
    dh_b1 += i_bh64 * M
    dh_w2 += i_bh64 * M * D
    b_db2 = tl.load(dht_b2 + i_bh64 * D + o_d, mask=m_d, other=0.0)
    b_dte = tl.zeros([BT], dtype=tl.float32)
    b_dgamma = tl.zeros([BD], dtype=tl.float32)
    b_dbeta = tl.zeros([BD], dtype=tl.float32)
    # the first / last segments of the sweep are peeled with constexpr flags (only they read the returned /
    # carried gradient sums)
    ptrs = (q, k, v, lr, ckpt_w1, ckpt_b1, ckpt_w2, ckpt_b2, g0_w1, g0_b1, g0_w2, g0_b2, dgt_w1, dgt_b1, dgt_w2,
            dgt_b2, dk_f, dlr_f, x2b_f, dz1b_f, dg1l_f, dx2l_f, dz2b_f, dg2l_f, dk, dv, dh_w1, dh_b1, dh_w2,
            dg0s_w1, dg0s_b1, dg0s_w2, dg0s_b2)  # fmt: skip
    head = (b_gamma, b_beta, b_te, te, te_last)
    pos = (i_bh64, tok0, o_i, o_d, o_j, m_d, T_i, offset, NS, eps)
    if ONE_SEGMENT:
        b_db2, b_dte, b_dgamma, b_dbeta = _seq_segment(
            0, ptrs, (b_db2, b_dte, b_dgamma, b_dbeta), head, pos, D, M, BD, BMT, NMT, MB, BT, PREC,
            LAST_PARTIAL, True,
        )  # fmt: skip
    else:
        b_db2, b_dte, b_dgamma, b_dbeta = _seq_segment(
            NS_i - 1, ptrs, (b_db2, b_dte, b_dgamma, b_dbeta), head, pos, D, M, BD, BMT, NMT, MB, BT, PREC,
            LAST_PARTIAL, False,
        )  # fmt: skip
        for i_s in range(2, NS_i):
            b_db2, b_dte, b_dgamma, b_dbeta = _seq_segment(
                NS_i - i_s, ptrs, (b_db2, b_dte, b_dgamma, b_dbeta), head, pos, D, M, BD, BMT, NMT, MB, BT,
                PREC, False, False,
            )  # fmt: skip
        b_db2, b_dte, b_dgamma, b_dbeta = _seq_segment(
            0, ptrs, (b_db2, b_dte, b_dgamma, b_dbeta), head, pos, D, M, BD, BMT, NMT, MB, BT, PREC, False, True,
        )  # fmt: skip
    tl.store(dh_b2 + i_bh64 * D + o_d, b_db2, mask=m_d)
    tl.store(dte_s + i_bh64 * MB + o_i, b_dte, mask=o_i < MB)
    tl.store(dlnw_s + i_bh64 * D + o_d, b_dgamma, mask=m_d)
    tl.store(dlnb_s + i_bh64 * D + o_d, b_dbeta, mask=m_d)


def block_sizes(D: int, M: int, mini_batch_size: int) -> dict:
    """BD, BT (D and b padded to powers of two >= 16), the M tile width BMT and the tile count NMT."""
    BM = max(16, triton.next_power_of_2(M))
    BMT = min(BM, MAX_BLOCK_M)
    return dict(
        BD=max(16, triton.next_power_of_2(D)),
        BT=max(16, triton.next_power_of_2(mini_batch_size)),
        BMT=BMT,
        NMT=triton.cdiv(M, BMT),
    )


class LocalGrads(NamedTuple):
    """What the parallel stage of the backward leaves for the sequential one (fp32 unless noted).

    dq [B, H, T, D] (dtype of q, complete); dk, dlr: the output-path parts of dk and dlr; x2b = X2b and
    dz1b = dLoss/dZ1b [B, H, T, M]; dz2b = dLoss/dZ2b [B, H, T, D]; dg1 [T, M], dx2 [T, M], dg2 [T, D]:
    dLoss/dG1, dLoss/dX2, dLoss/dG2 through the output path only; dte, dln_w, dln_b: per-segment partials
    [N, H, NS, b] / [N, H, NS, D]; dg0: the output-path gradient of the carried gradient sums (4 tensors).
    """

    dq: torch.Tensor
    dk: torch.Tensor
    dlr: torch.Tensor
    x2b: torch.Tensor
    dz1b: torch.Tensor
    dg1: torch.Tensor
    dx2: torch.Tensor
    dz2b: torch.Tensor
    dg2: torch.Tensor
    dte: torch.Tensor
    dln_w: torch.Tensor
    dln_b: torch.Tensor
    dg0: tuple[torch.Tensor, ...]


def chunk_ttt_mlp_bwd_local(
    q, k, v, lr, token_eta, ln_weight, ln_bias, ckpt, g0, do, *, offset, causal, eps, cu_seqlens=None
) -> LocalGrads:
    """Launch the parallel stage of the backward (one program per (segment, sequence, head); segment 0,
    which reads the carried gradient sums, in a launch of its own): every gradient of the output path,
    from the checkpointed anchors. Arguments as ``chunk_ttt_mlp_bwd``."""
    Bq, H, T, D = q.shape
    M = g0[1].shape[-1]
    MB = token_eta.shape[0]
    B, NS, _ = varlen_plan(cu_seqlens, offset, MB, Bq, T)
    meta = dict(H=H, D=D, M=M, MB=MB, PREC=checkpoint_precision(q.dtype, ckpt[0].dtype),
                **block_sizes(D, M, MB))  # fmt: skip
    rows = lambda *shape: q.new_empty(*shape, dtype=torch.float32)  # noqa: E731
    out = LocalGrads(
        dq=torch.empty_like(q), dk=rows(Bq, H, T, D), dlr=rows(Bq, H, T), x2b=rows(Bq, H, T, M),
        dz1b=rows(Bq, H, T, M), dg1=rows(Bq, H, T, M), dx2=rows(Bq, H, T, M), dz2b=rows(Bq, H, T, D),
        dg2=rows(Bq, H, T, D), dte=rows(B, H, NS, MB), dln_w=rows(B, H, NS, D), dln_b=rows(B, H, NS, D),
        dg0=tuple(torch.empty_like(t) for t in g0),
    )  # fmt: skip
    for n0, ns, has_s in ((0, 1, True), (1, NS - 1, False)):
        if ns == 0:
            continue
        chunk_ttt_mlp_bwd_kernel_local[(ns, B * H)](
            q, k, v, lr, token_eta, ln_weight, ln_bias, *ckpt, *g0, do,
            out.dq, out.dk, out.dlr, out.x2b, out.dz1b, out.dg1, out.dx2, out.dz2b, out.dg2, out.dte,
            out.dln_w, out.dln_b, *out.dg0, cu_seqlens, T, offset, NS, n0, eps,
            CAUSAL=causal, HAS_S=has_s, num_warps=NUM_WARPS, **meta,
        )  # fmt: skip
    return out


def chunk_ttt_mlp_bwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lr: torch.Tensor,
    token_eta: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    ckpt: tuple[torch.Tensor, ...],
    g0: tuple[torch.Tensor, ...],
    do: torch.Tensor,
    dht: tuple[torch.Tensor, ...],
    dgt: tuple[torch.Tensor, ...],
    *,
    offset: int,
    causal: bool,
    eps: float,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple:
    """Launch the backward.

    Args:
        q, k, v, do: ``[B, H, T, D]`` contiguous; lr ``[B, H, T]``; token_eta ``[b]``, ln_weight / ln_bias
            ``[H, D]`` fp32.
        ckpt: per-segment anchors (W1 ``[B, H, NS, D, M]``, b1 ``[B, H, NS, M]``, W2 ``[B, H, NS, M, D]``,
            b2 ``[B, H, NS, D]``; W1, W2 in ``checkpoint_dtype``, b1, b2 fp32); g0: the carried gradient sums
            (W1 / b1 / W2 / b2 shapes, fp32).
        dht, dgt: gradients w.r.t. the final anchor and the final gradient sums (fp32, same shapes as g0).
        cu_seqlens: ``[N + 1]`` offsets of N sequences packed along T (q ``[1, H, sum T_n, D]``): B = N in
            the state shapes and NS is the most segments of any sequence. Default: None.

    Returns:
        dq, dk, dv (dtype of q), dlr ``[B, H, T]`` fp32, dte ``[b]``, dln_w, dln_b ``[H, D]``, the gradient
        w.r.t. the initial anchor (4 tensors) and w.r.t. the initial gradient sums (4 tensors).

    Temporary memory per (batch, head): fp32 X2b, dZ1b, dG1_loc, dX2_loc ``[T, M]`` and dZ2b, dG2_loc,
    partial dk ``[T, D]`` (4 T M + 3 T D floats), plus per-segment partials of size ``b + 2 D``.
    """
    Bq, H, T, D = q.shape
    M = g0[1].shape[-1]
    MB = token_eta.shape[0]
    B, NS, lens = varlen_plan(cu_seqlens, offset, MB, Bq, T)
    meta = dict(H=H, D=D, M=M, MB=MB, PREC=checkpoint_precision(q.dtype, ckpt[0].dtype),
                **block_sizes(D, M, MB))  # fmt: skip
    f32 = dict(dtype=torch.float32)
    loc = chunk_ttt_mlp_bwd_local(
        q, k, v, lr, token_eta, ln_weight, ln_bias, ckpt, g0, do, offset=offset, causal=causal, eps=eps,
        cu_seqlens=cu_seqlens,
    )  # fmt: skip
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    dg0s = tuple(torch.empty_like(t) for t in g0)
    # the sequential kernel updates the anchor gradient in place, starting from d(final anchor)
    dh0 = tuple(t.clone() for t in dht[:3]) + (torch.empty_like(dht[3]),)
    dte_s = q.new_empty(B, H, MB, **f32)
    dlnw_s, dlnb_s = q.new_empty(B, H, D, **f32), q.new_empty(B, H, D, **f32)

    # the sequential kernel peels its first / last segments with constexpr flags: packed sequences are
    # launched in groups that share them
    groups = {}
    for n, t in enumerate(lens or [T] * B):
        flags = ((offset + t) % MB != 0, triton.cdiv(offset + t, MB) == 1)
        groups.setdefault(flags, []).extend(n * H + h for h in range(H))
    for (last_partial, one_segment), members in groups.items():
        ids = None if len(groups) == 1 else torch.tensor(members, dtype=torch.int32, device=q.device)
        chunk_ttt_mlp_bwd_kernel_seq[(len(members),)](
            q, k, v, lr, token_eta, ln_weight, ln_bias, *ckpt, *g0, dht[3], *dgt,
            loc.dk, loc.dlr, loc.x2b, loc.dz1b, loc.dg1, loc.dx2, loc.dz2b, loc.dg2, dk, dv, dte_s, dlnw_s, dlnb_s,
            *dh0, *dg0s, cu_seqlens, ids, T, offset, NS, eps,
            LAST_PARTIAL=last_partial, ONE_SEGMENT=one_segment, num_warps=NUM_WARPS, **meta,
        )  # fmt: skip
    dte = loc.dte.sum((0, 1, 2)) + dte_s.sum((0, 1))
    dln_w = loc.dln_w.sum((0, 2)) + dlnw_s.sum(0)
    dln_b = loc.dln_b.sum((0, 2)) + dlnb_s.sum(0)
    dg0 = tuple(a + b for a, b in zip(loc.dg0, dg0s))
    return loc.dq, dk, dv, loc.dlr, dte, dln_w, dln_b, dh0, dg0
