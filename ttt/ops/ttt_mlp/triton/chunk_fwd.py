"""Fused forward kernel of TTT-MLP (dual form, layer by layer): one program per (batch, head).

Dims: D head dim, M hidden width (4 D by default), padded to BD / BM (powers of two >= 16); b mini-batch
size (BT rows); NS segments on the grid ``u = offset + t`` exactly as in ``ttt_linear/triton/chunk_fwd.py``.
The fused kernel keeps the fast weights W1 [D, M], b1 [M], W2 [M, D], b2 [D] in registers in fp32; the
tiled kernel (for hidden layers too large for that) keeps them in memory and walks M in tiles. Per segment:

    Z1 = K W1 + b1,  X2 = gelu(Z1),  Z2 = X2 W2 + b2,  G2 = LN-L2 grad(Z2),  G1 = (G2 W2^T) * gelu'(Z1)
    causal:   Z1b = Q W1 + b1 - eta (Q S1 + s1) - (E * (Q K^T + 1)) G1,   X2b = gelu(Z1b)
              Z2b = X2b W2 + b2 - eta (X2b S2 + s2) - (E * (X2b X2^T + 1)) G2
    non-causal: every query reads the weights after the segment's last token
    o = Q + LN(Z2b);  full mini-batch: W <- W - te[b-1] (S + U) with U1 = K^T (lr G1), U2 = X2^T (lr G2)

With ``ckpt_*`` given, the anchor at the start of every segment is written out (training): W1, W2 in
``checkpoint_dtype`` (bf16 under bf16 dots, else fp32), b1, b2 in fp32.

Packed sequences (``cu_seqlens`` [N + 1], q [1, H, sum T_n, D]): one program per (sequence, head), each
with its own length and segment count (``_span`` / ``varlen_plan`` of TTT-Linear); the checkpoint
stride is the most segments of any sequence. ``IS_VARLEN`` is a constexpr: the dense path is unchanged.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

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

# the largest [BD, BM] weight tile the fused forward holds on chip: BD = 64, BM = 256 ran on the H200. Static
# sm_90 builds at BD * BM = 64 * 256 need 153-197 KB of shared memory ((128, 128), (32, 512), (64, 256),
# (16, 1024)), at BD = 128, BM = 256 297 KB, over the 227 KB an H100 / H200 block may have. Larger hidden
# layers take the tiled forward; $TTT_MLP_FORWARD = "fused" | "tiled" forces one (a GPU with less shared
# memory than the fused forward needs says so with an error naming it: nothing falls back silently).
FUSED_MAX_TILE = 64 * 256
FORWARD_KERNELS = ("auto", "fused", "tiled")
# hidden-dimension tile of the tiled forward (as the backward's MAX_BLOCK_M)
TILED_BLOCK_M = 32


def forward_kernel(BD: int, BM: int) -> str:
    """``"fused"`` or ``"tiled"``: ``$TTT_MLP_FORWARD`` if set, else fused while the ``[BD, BM]`` weight
    tile fits ``FUSED_MAX_TILE``."""
    choice = os.environ.get("TTT_MLP_FORWARD", "auto")
    if choice not in FORWARD_KERNELS:
        raise ValueError(f"TTT_MLP_FORWARD must be one of {FORWARD_KERNELS}, got {choice!r}")
    if choice == "auto":
        return "fused" if BD * BM <= FUSED_MAX_TILE else "tiled"
    return choice


@triton.jit
def _gelu_tanh(x):
    """gelu(x) and gelu'(x), tanh approximation (tanh through the sigmoid: no libdevice needed)."""
    c = 0.7978845608028654
    t = 2.0 * tl.sigmoid(2.0 * c * (x + 0.044715 * x * x * x)) - 1.0
    return 0.5 * x * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * c * (1.0 + 3.0 * 0.044715 * x * x)


@triton.jit
def _load_w_tile(w1, b1, w2, o_d, o_m, m_d, m_m, D: tl.constexpr, M: tl.constexpr):
    """Columns o_m of W1 [D, M] and b1 [M], rows o_m of W2 [M, D], zero outside; pointers at the base."""
    b_w1 = tl.load(w1 + o_d[:, None] * M + o_m[None, :], mask=m_d[:, None] & m_m[None, :], other=0.0)
    b_b1 = tl.load(b1 + o_m, mask=m_m, other=0.0)
    b_w2 = tl.load(w2 + o_m[:, None] * D + o_d[None, :], mask=m_m[:, None] & m_d[None, :], other=0.0)
    return b_w1, b_b1, b_w2


@triton.jit
def _store_w_tile(w1, b1, w2, b_w1, b_b1, b_w2, o_d, o_m, m_d, m_m, D: tl.constexpr, M: tl.constexpr):
    """The inverse of ``_load_w_tile``: write columns o_m of W1 and b1, rows o_m of W2 (W in the dtype of
    the destination: the checkpoints may be bf16)."""
    tl.store(
        w1 + o_d[:, None] * M + o_m[None, :], b_w1.to(w1.dtype.element_ty), mask=m_d[:, None] & m_m[None, :]
    )
    tl.store(b1 + o_m, b_b1, mask=m_m)
    tl.store(
        w2 + o_m[:, None] * D + o_d[None, :], b_w2.to(w2.dtype.element_ty), mask=m_m[:, None] & m_d[None, :]
    )


@triton.jit
def _mlp_segment(
    n, q, k, v, lr, te, g0_w1, g0_b1, g0_w2, g0_b2, o, gt_w1, gt_b1, gt_w2, gt_b2,
    ckpt_w1, ckpt_b1, ckpt_w2, ckpt_b2, b_w1, b_b1, b_w2, b_b2, b_gamma, b_beta, b_te, te_last,
    i_bh64, tok0, o_i, o_d, o_m, m_d, m_m, o_dm, o_md, m_dm, m_md, T, offset, NS, NS_i, eps,
    D: tl.constexpr, M: tl.constexpr, MB: tl.constexpr, BT: tl.constexpr, CAUSAL: tl.constexpr,
    PREC: tl.constexpr, STORE_CKPT: tl.constexpr, HAS_S: tl.constexpr,
):  # fmt: skip
    """One mini-batch segment: outputs, checkpoint, and the anchor after it. Returns (W1, b1, W2, b2).

    tok0, T, NS_i: this sequence's first token, length and segment count; NS: the checkpoint stride
    (the most segments of any sequence of the call).
    """
    o_t, m_t, b_eta, m_a, p_last, f_done = _segment_masks(n, o_i, offset, T, te, b_te, MB, BT, CAUSAL)
    p_tok, m_td, b_q, b_k, b_v, b_lr = _segment_rows(q, k, v, lr, tok0, o_t, m_t, o_d, m_d, D)
    if STORE_CKPT:
        p_ck = i_bh64 * NS + n
        tl.store(ckpt_w1 + p_ck * D * M + o_dm, b_w1.to(ckpt_w1.dtype.element_ty), mask=m_dm)
        tl.store(ckpt_b1 + p_ck * M + o_m, b_b1, mask=m_m)
        tl.store(ckpt_w2 + p_ck * M * D + o_md, b_w2.to(ckpt_w2.dtype.element_ty), mask=m_md)
        tl.store(ckpt_b2 + p_ck * D + o_d, b_b2, mask=m_d)

    # inner gradients at the anchor
    b_z1 = _dot(b_k, b_w1, PREC) + b_b1[None, :]  # [BT, BM]
    b_x2, b_dgelu = _gelu_tanh(b_z1)
    b_z2 = _dot(b_x2, b_w2, PREC) + b_b2[None, :]  # [BT, BD]
    b_g2, _, _, _, _ = _ln_l2_grad(b_z2, b_v - b_k, b_gamma, b_beta, m_td, m_d, D, eps)
    b_g1 = _dot(b_g2, tl.trans(b_w2), PREC) * b_dgelu  # [BT, BM]
    b_lg1 = b_g1 * b_lr[:, None]
    b_lg2 = b_g2 * b_lr[:, None]
    b_u1 = _dot(tl.trans(b_k), b_lg1, PREC)  # [BD, BM]
    b_u2 = _dot(tl.trans(b_x2), b_lg2, PREC)  # [BM, BD]
    b_ub1 = tl.sum(b_lg1, axis=0)
    b_ub2 = tl.sum(b_lg2, axis=0)
    if HAS_S:
        b_s1 = tl.load(g0_w1 + i_bh64 * D * M + o_dm, mask=m_dm, other=0.0)
        b_sb1 = tl.load(g0_b1 + i_bh64 * M + o_m, mask=m_m, other=0.0)
        b_s2 = tl.load(g0_w2 + i_bh64 * M * D + o_md, mask=m_md, other=0.0)
        b_sb2 = tl.load(g0_b2 + i_bh64 * D + o_d, mask=m_d, other=0.0)

    if CAUSAL:
        b_a1 = tl.where(
            m_a,
            b_eta[:, None] * b_lr[None, :] * (_dot(b_q, tl.trans(b_k), PREC) + 1.0),
            0.0,
        )
        b_z1b = _dot(b_q, b_w1, PREC) + b_b1[None, :] - _dot(b_a1, b_g1, PREC)
        if HAS_S:
            b_z1b -= b_eta[:, None] * (_dot(b_q, b_s1, PREC) + b_sb1[None, :])
        b_x2b, _ = _gelu_tanh(b_z1b)
        b_p2 = _dot(b_x2b, tl.trans(b_x2), PREC)
        b_a2 = tl.where(m_a, b_eta[:, None] * b_lr[None, :] * (b_p2 + 1.0), 0.0)
        b_z2b = _dot(b_x2b, b_w2, PREC) + b_b2[None, :] - _dot(b_a2, b_g2, PREC)
        if HAS_S:
            b_z2b -= b_eta[:, None] * (_dot(b_x2b, b_s2, PREC) + b_sb2[None, :])
    else:
        # weights after the segment's last token (eta is that token's te, same on every row)
        eta_p = tl.max(b_eta, axis=0)
        w1e = b_w1 - eta_p * b_u1
        b1e = b_b1 - eta_p * b_ub1
        w2e = b_w2 - eta_p * b_u2
        b2e = b_b2 - eta_p * b_ub2
        if HAS_S:
            w1e -= eta_p * b_s1
            b1e -= eta_p * b_sb1
            w2e -= eta_p * b_s2
            b2e -= eta_p * b_sb2
        b_x2b, _ = _gelu_tanh(_dot(b_q, w1e, PREC) + b1e[None, :])
        b_z2b = _dot(b_x2b, w2e, PREC) + b2e[None, :]
    b_xb, _ = _ln_rows(b_z2b, m_d, D, eps)
    b_o = b_q + b_xb * b_gamma[None, :] + b_beta[None, :]
    tl.store(o + p_tok, b_o.to(o.dtype.element_ty), mask=m_td)

    if HAS_S:
        b_u1 += b_s1
        b_ub1 += b_sb1
        b_u2 += b_s2
        b_ub2 += b_sb2
    # a trailing partial mini-batch hands its gradient sums to the next call
    if n == NS_i - 1:
        keep = 1.0 - f_done
        tl.store(gt_w1 + i_bh64 * D * M + o_dm, keep * b_u1, mask=m_dm)
        tl.store(gt_b1 + i_bh64 * M + o_m, keep * b_ub1, mask=m_m)
        tl.store(gt_w2 + i_bh64 * M * D + o_md, keep * b_u2, mask=m_md)
        tl.store(gt_b2 + i_bh64 * D + o_d, keep * b_ub2, mask=m_d)
    step = f_done * te_last
    return b_w1 - step * b_u1, b_b1 - step * b_ub1, b_w2 - step * b_u2, b_b2 - step * b_ub2


@triton.heuristics(
    {
        "STORE_CKPT": lambda args: args["ckpt_w1"] is not None,
        "IS_VARLEN": lambda args: args["cu_seqlens"] is not None,
    }
)
@triton.jit(do_not_specialize=["T", "offset", "NS"])
def chunk_ttt_mlp_fwd_kernel_fused(
    q, k, v, lr, te, ln_w, ln_b, h0_w1, h0_b1, h0_w2, h0_b2, g0_w1, g0_b1, g0_w2, g0_b2,
    o, ht_w1, ht_b1, ht_w2, ht_b2, gt_w1, gt_b1, gt_w2, gt_b2, ckpt_w1, ckpt_b1, ckpt_w2, ckpt_b2,
    cu_seqlens, T, offset, NS, eps,
    H: tl.constexpr, D: tl.constexpr, M: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr,
    MB: tl.constexpr, BT: tl.constexpr, CAUSAL: tl.constexpr, PREC: tl.constexpr, STORE_CKPT: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):  # fmt: skip
    i_bh = tl.program_id(0)
    # packed sequences: program i_bh = n * H + h runs sequence n (its own length and segment count)
    tok0, T_i, NS_i = _span(i_bh, T, NS, offset, cu_seqlens, H, MB, IS_VARLEN)
    i_h = i_bh % H
    i_bh64 = i_bh.to(tl.int64)
    o_i = tl.arange(0, BT)
    o_d = tl.arange(0, BD)
    o_m = tl.arange(0, BM)
    m_d = o_d < D
    m_m = o_m < M
    o_dm = o_d[:, None] * M + o_m[None, :]
    o_md = o_m[:, None] * D + o_d[None, :]
    m_dm = m_d[:, None] & m_m[None, :]
    m_md = m_m[:, None] & m_d[None, :]
    b_gamma, b_beta, b_te, te_last = _head_params(ln_w, ln_b, te, i_h, o_d, m_d, o_i, D, MB)
    b_w1 = tl.load(h0_w1 + i_bh64 * D * M + o_dm, mask=m_dm, other=0.0)
    b_b1 = tl.load(h0_b1 + i_bh64 * M + o_m, mask=m_m, other=0.0)
    b_w2 = tl.load(h0_w2 + i_bh64 * M * D + o_md, mask=m_md, other=0.0)
    b_b2 = tl.load(h0_b2 + i_bh64 * D + o_d, mask=m_d, other=0.0)

    # segment 0 also reads the gradient sums carried in by the state: peeled with a constexpr flag
    b_w1, b_b1, b_w2, b_b2 = _mlp_segment(
        0, q, k, v, lr, te, g0_w1, g0_b1, g0_w2, g0_b2, o, gt_w1, gt_b1, gt_w2, gt_b2,
        ckpt_w1, ckpt_b1, ckpt_w2, ckpt_b2, b_w1, b_b1, b_w2, b_b2, b_gamma, b_beta, b_te, te_last,
        i_bh64, tok0, o_i, o_d, o_m, m_d, m_m, o_dm, o_md, m_dm, m_md, T_i, offset, NS, NS_i, eps,
        D, M, MB, BT, CAUSAL, PREC, STORE_CKPT, True,
    )  # fmt: skip
    for n in range(1, NS_i):
        b_w1, b_b1, b_w2, b_b2 = _mlp_segment(
            n, q, k, v, lr, te, g0_w1, g0_b1, g0_w2, g0_b2, o, gt_w1, gt_b1, gt_w2, gt_b2,
            ckpt_w1, ckpt_b1, ckpt_w2, ckpt_b2, b_w1, b_b1, b_w2, b_b2, b_gamma, b_beta, b_te, te_last,
            i_bh64, tok0, o_i, o_d, o_m, m_d, m_m, o_dm, o_md, m_dm, m_md, T_i, offset, NS, NS_i, eps,
            D, M, MB, BT, CAUSAL, PREC, STORE_CKPT, False,
        )  # fmt: skip
    tl.store(ht_w1 + i_bh64 * D * M + o_dm, b_w1, mask=m_dm)
    tl.store(ht_b1 + i_bh64 * M + o_m, b_b1, mask=m_m)
    tl.store(ht_w2 + i_bh64 * M * D + o_md, b_w2, mask=m_md)
    tl.store(ht_b2 + i_bh64 * D + o_d, b_b2, mask=m_d)


@triton.jit
def _tiled_segment(
    n, q, k, v, lr, te, g0_w1, g0_b1, g0_w2, g0_b2, o, w1, b1, w2, gt_w1, gt_b1, gt_w2, gt_b2,
    ckpt_w1, ckpt_b1, ckpt_w2, ckpt_b2, b_b2, b_gamma, b_beta, b_te, te_last,
    i_bh64, tok0, o_i, o_d, o_j, m_d, T, offset, NS, NS_i, eps,
    D: tl.constexpr, M: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, BMT: tl.constexpr,
    NMT: tl.constexpr, MB: tl.constexpr, CAUSAL: tl.constexpr, PREC: tl.constexpr,
    STORE_CKPT: tl.constexpr, HAS_S: tl.constexpr,
):  # fmt: skip
    """``_mlp_segment`` with the anchor in memory (w1, b1, w2: this program's slices, updated in place)
    walked in BMT-column tiles of the hidden dimension. Returns b2 after the segment.

    Pass A: Z2 = gelu(K W1 + b1) W2 over the tiles (and the checkpoint); G2 at Z2 + b2. Pass B, per tile:
    G1, U1, U2, the tile's share of the query path, then the tile's anchor step, written back after a
    barrier (a tile is read and rewritten by different threads). Same equations as ``_mlp_segment``.
    """
    o_t, m_t, b_eta, m_a, p_last, f_done = _segment_masks(n, o_i, offset, T, te, b_te, MB, BT, CAUSAL)
    p_tok, m_td, b_q, b_k, b_v, b_lr = _segment_rows(q, k, v, lr, tok0, o_t, m_t, o_d, m_d, D)
    p_ck = i_bh64 * NS + n

    # pass A: the inner model's output at the anchor
    b_z2 = tl.zeros([BT, BD], dtype=tl.float32)
    for i_m in range(NMT):
        o_m = i_m * BMT + o_j
        m_m = o_m < M
        b_w1, b_b1, b_w2 = _load_w_tile(w1, b1, w2, o_d, o_m, m_d, m_m, D, M)
        if STORE_CKPT:
            _store_w_tile(ckpt_w1 + p_ck * D * M, ckpt_b1 + p_ck * M, ckpt_w2 + p_ck * M * D, b_w1, b_b1, b_w2,
                          o_d, o_m, m_d, m_m, D, M)  # fmt: skip
        b_x2 = _gelu_tanh(_dot(b_k, b_w1, PREC) + b_b1[None, :])[0]
        b_z2 += _dot(b_x2, b_w2, PREC)
    if STORE_CKPT:
        tl.store(ckpt_b2 + p_ck * D + o_d, b_b2, mask=m_d)
    b_g2 = _ln_l2_grad(b_z2 + b_b2[None, :], b_v - b_k, b_gamma, b_beta, m_td, m_d, D, eps)[0]
    b_lg2 = b_g2 * b_lr[:, None]
    b_ub2 = tl.sum(b_lg2, axis=0)
    if HAS_S:
        b_ub2 += tl.load(g0_b2 + i_bh64 * D + o_d, mask=m_d, other=0.0)
    if CAUSAL:
        b_a1 = tl.where(
            m_a,
            b_eta[:, None] * b_lr[None, :] * (_dot(b_q, tl.trans(b_k), PREC) + 1.0),
            0.0,
        )
        b_p2 = tl.zeros([BT, BT], dtype=tl.float32)  # X2b X2^T, summed over the tiles
        # b2 - eta (s2 + this segment's earlier tokens) enters through A2 below; the carried sum here
        b_z2b = b_b2[None, :] + tl.zeros([BT, BD], dtype=tl.float32)
        if HAS_S:
            b_z2b -= b_eta[:, None] * tl.load(g0_b2 + i_bh64 * D + o_d, mask=m_d, other=0.0)[None, :]
    else:
        eta_p = tl.max(b_eta, axis=0)  # every row reads the weights after the segment's last token
        b_z2b = (b_b2 - eta_p * b_ub2)[None, :] + tl.zeros([BT, BD], dtype=tl.float32)
    step = f_done * te_last
    keep = 1.0 - f_done
    tl.debug_barrier()  # pass A's reads of the tiles come before pass B's writes

    # pass B: per tile, the update and the query path
    for i_m in range(NMT):
        o_m = i_m * BMT + o_j
        m_m = o_m < M
        b_w1, b_b1, b_w2 = _load_w_tile(w1, b1, w2, o_d, o_m, m_d, m_m, D, M)
        b_x2, b_dgelu = _gelu_tanh(_dot(b_k, b_w1, PREC) + b_b1[None, :])
        b_g1 = _dot(b_g2, tl.trans(b_w2), PREC) * b_dgelu  # [BT, BMT]
        b_lg1 = b_g1 * b_lr[:, None]
        b_u1 = _dot(tl.trans(b_k), b_lg1, PREC)  # [BD, BMT]
        b_ub1 = tl.sum(b_lg1, axis=0)
        b_u2 = _dot(tl.trans(b_x2), b_lg2, PREC)  # [BMT, BD]
        if HAS_S:
            b_s1, b_sb1, b_s2 = _load_w_tile(g0_w1 + i_bh64 * D * M, g0_b1 + i_bh64 * M, g0_w2 + i_bh64 * M * D,
                                             o_d, o_m, m_d, m_m, D, M)  # fmt: skip
        if CAUSAL:
            b_z1b = _dot(b_q, b_w1, PREC) + b_b1[None, :]
            b_z1b -= _dot(b_a1, b_g1, PREC)
            if HAS_S:
                b_z1b -= b_eta[:, None] * (_dot(b_q, b_s1, PREC) + b_sb1[None, :])
            b_x2b = _gelu_tanh(b_z1b)[0]
            b_z2b += _dot(b_x2b, b_w2, PREC)
            if HAS_S:
                b_z2b -= b_eta[:, None] * _dot(b_x2b, b_s2, PREC)
            b_p2 += _dot(b_x2b, tl.trans(b_x2), PREC)
        if HAS_S:
            b_u1 += b_s1
            b_ub1 += b_sb1
            b_u2 += b_s2
        if not CAUSAL:
            b_x2b = _gelu_tanh(_dot(b_q, b_w1 - eta_p * b_u1, PREC) + (b_b1 - eta_p * b_ub1)[None, :])[0]
            b_z2b += _dot(b_x2b, b_w2 - eta_p * b_u2, PREC)
        # a trailing partial mini-batch hands its gradient sums to the next call
        if n == NS_i - 1:
            _store_w_tile(gt_w1 + i_bh64 * D * M, gt_b1 + i_bh64 * M, gt_w2 + i_bh64 * M * D, keep * b_u1,
                          keep * b_ub1, keep * b_u2, o_d, o_m, m_d, m_m, D, M)  # fmt: skip
        tl.debug_barrier()  # every thread has read this tile before any overwrites it
        _store_w_tile(w1, b1, w2, b_w1 - step * b_u1, b_b1 - step * b_ub1, b_w2 - step * b_u2, o_d, o_m, m_d,
                      m_m, D, M)  # fmt: skip
    tl.debug_barrier()  # the next segment reads the stepped tiles

    if CAUSAL:
        b_a2 = tl.where(m_a, b_eta[:, None] * b_lr[None, :] * (b_p2 + 1.0), 0.0)
        b_z2b -= _dot(b_a2, b_g2, PREC)
    b_xb = _ln_rows(b_z2b, m_d, D, eps)[0]
    tl.store(o + p_tok, (b_q + b_xb * b_gamma[None, :] + b_beta[None, :]).to(o.dtype.element_ty), mask=m_td)
    if n == NS_i - 1:
        tl.store(gt_b2 + i_bh64 * D + o_d, keep * b_ub2, mask=m_d)
    return b_b2 - step * b_ub2


@triton.heuristics(
    {
        "STORE_CKPT": lambda args: args["ckpt_w1"] is not None,
        "IS_VARLEN": lambda args: args["cu_seqlens"] is not None,
    }
)
@triton.jit(do_not_specialize=["T", "offset", "NS"])
def chunk_ttt_mlp_fwd_kernel_tiled(
    q, k, v, lr, te, ln_w, ln_b, h0_b2, g0_w1, g0_b1, g0_w2, g0_b2,
    o, ht_w1, ht_b1, ht_w2, ht_b2, gt_w1, gt_b1, gt_w2, gt_b2, ckpt_w1, ckpt_b1, ckpt_w2, ckpt_b2,
    cu_seqlens, T, offset, NS, eps,
    H: tl.constexpr, D: tl.constexpr, M: tl.constexpr, BD: tl.constexpr, BMT: tl.constexpr, NMT: tl.constexpr,
    MB: tl.constexpr, BT: tl.constexpr, CAUSAL: tl.constexpr, PREC: tl.constexpr, STORE_CKPT: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):  # fmt: skip
    """The forward for hidden sizes whose [D, M] tiles do not fit on chip: the anchor (W1, b1, W2) lives
    in ht_* (copied from the initial anchor by the launcher) and is stepped in place; b2 in registers."""
    i_bh = tl.program_id(0)
    tok0, T_i, NS_i = _span(i_bh, T, NS, offset, cu_seqlens, H, MB, IS_VARLEN)
    i_h = i_bh % H
    i_bh64 = i_bh.to(tl.int64)
    o_i = tl.arange(0, BT)
    o_d = tl.arange(0, BD)
    o_j = tl.arange(0, BMT)
    m_d = o_d < D
    b_gamma, b_beta, b_te, te_last = _head_params(ln_w, ln_b, te, i_h, o_d, m_d, o_i, D, MB)
    b_b2 = tl.load(h0_b2 + i_bh64 * D + o_d, mask=m_d, other=0.0)
    w1, b1, w2 = ht_w1 + i_bh64 * D * M, ht_b1 + i_bh64 * M, ht_w2 + i_bh64 * M * D

    b_b2 = _tiled_segment(
        0, q, k, v, lr, te, g0_w1, g0_b1, g0_w2, g0_b2, o, w1, b1, w2, gt_w1, gt_b1, gt_w2, gt_b2,
        ckpt_w1, ckpt_b1, ckpt_w2, ckpt_b2, b_b2, b_gamma, b_beta, b_te, te_last,
        i_bh64, tok0, o_i, o_d, o_j, m_d, T_i, offset, NS, NS_i, eps,
        D, M, BT, BD, BMT, NMT, MB, CAUSAL, PREC, STORE_CKPT, True,
    )  # fmt: skip
    for n in range(1, NS_i):
        b_b2 = _tiled_segment(
            n, q, k, v, lr, te, g0_w1, g0_b1, g0_w2, g0_b2, o, w1, b1, w2, gt_w1, gt_b1, gt_w2, gt_b2,
            ckpt_w1, ckpt_b1, ckpt_w2, ckpt_b2, b_b2, b_gamma, b_beta, b_te, te_last,
            i_bh64, tok0, o_i, o_d, o_j, m_d, T_i, offset, NS, NS_i, eps,
            D, M, BT, BD, BMT, NMT, MB, CAUSAL, PREC, STORE_CKPT, False,
        )  # fmt: skip
    tl.store(ht_b2 + i_bh64 * D + o_d, b_b2, mask=m_d)


def chunk_ttt_mlp_fwd_fused(
    q, k, v, lr, token_eta, ln_weight, ln_bias, h0, g0, *, offset, causal, eps, store_ckpt, cu_seqlens=None
):
    """Launch the forward. q, k, v [B, H, T, D] contiguous; h0 / g0 = (W1 [B, H, D, M], b1 [B, H, M],
    W2 [B, H, M, D], b2 [B, H, D]) contiguous fp32. Returns o, the final anchor, the final gradient sums and
    the per-segment anchors (each [B, H, NS, ...]) or None.

    ``cu_seqlens`` [N + 1]: N sequences packed along T (q, k, v [1, H, sum T_n, D], lr [1, H, sum T_n]),
    one program per (sequence, head), all starting at ``offset``; the states then have N rows and NS is
    the most segments of any sequence."""
    B, H, T, D = q.shape
    M = h0[1].shape[-1]
    MB = token_eta.shape[0]
    B, NS, _ = varlen_plan(cu_seqlens, offset, MB, B, T)
    BD, BM = max(16, triton.next_power_of_2(D)), max(16, triton.next_power_of_2(M))
    BT = max(16, triton.next_power_of_2(MB))
    prec = dot_precision(q.dtype)
    o = torch.empty_like(q)
    ht = tuple(torch.empty_like(t) for t in h0)
    gt = tuple(torch.empty_like(t) for t in g0)
    ckpt = (None,) * 4
    if store_ckpt:
        # W1, W2 in the dtype the dots round them to (the backward uses them only as dot operands), as
        # TTT-Linear's checkpoints; b1, b2 fp32
        wd = checkpoint_dtype(prec)
        ckpt = tuple(
            q.new_empty(B, H, NS, *t.shape[2:], dtype=d) for t, d in zip(h0, (wd, torch.float32) * 2)
        )
    args = (q, k, v, lr, token_eta, ln_weight, ln_bias)
    meta = dict(H=H, D=D, M=M, BD=BD, MB=MB, BT=BT, CAUSAL=causal, PREC=prec)
    if forward_kernel(BD, BM) == "fused":
        try:
            chunk_ttt_mlp_fwd_kernel_fused[(B * H,)](
                *args, *h0, *g0, o, *ht, *gt, *ckpt, cu_seqlens, T, offset, NS, eps,
                BM=BM, num_warps=4 if BM <= 128 else 8, **meta,
            )  # fmt: skip
        except triton.runtime.errors.OutOfResources as err:
            raise RuntimeError(
                f"the fused TTT-MLP forward (D={D}, M={M}) does not fit this GPU ({err}); set "
                "TTT_MLP_FORWARD=tiled to run the tiled forward"
            ) from err
        return o, ht, gt, (ckpt if store_ckpt else None)
    # the anchor is stepped in place in ht, walked in tiles of the hidden dimension
    for dst, src in zip(ht[:3], h0[:3]):
        dst.copy_(src)
    BMT = min(BM, TILED_BLOCK_M)
    chunk_ttt_mlp_fwd_kernel_tiled[(B * H,)](
        *args, h0[3], *g0, o, *ht, *gt, *ckpt, cu_seqlens, T, offset, NS, eps,
        BMT=BMT, NMT=triton.cdiv(M, BMT), num_warps=8, **meta,
    )  # fmt: skip
    return o, ht, gt, (ckpt if store_ckpt else None)
