"""Fused backward kernel of TTT-Linear: one program per (batch, head), mini-batch segments in reverse.

Dims as in ``chunk_fwd.py``. Each segment is recomputed from the anchor the forward checkpointed at its
start (``ckpt_w`` / ``ckpt_b``), so nothing of size T * D besides the inputs and ``do`` is kept between
forward and backward. The gradient of the loss w.r.t. the segment's output anchor (``dW`` [D, D],
``db`` [D]) is carried backwards in registers, in fp32.

Per segment (anchor W0, b0; carried gradient sum S = (gW, gb) only in the first segment):
    Z  = K W0 + b0,   G = LN-L2 gradient at Z (rows outside the call zeroed)
    Zb = Q W0 + b0 - eta * (Q gW + gb) - (E * (Q K^T + 1)) G,   o = Q + LN(Zb)
    U  = K^T (lr * G), u = sum_j lr_j G_j
    full mini-batch:   W0' = W0 - te[b-1] (gW + U)   (gradient sum restarts at zero)
    partial (last):    W0' = W0,  gW' = gW + U
and the backward applies the chain rule to each line, including the second-order LayerNorm terms of G.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .chunk_fwd import _ln_rows, launch_config


@triton.jit(do_not_specialize=["T", "offset", "NS"])
def chunk_ttt_linear_bwd_kernel_fused(
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
    dht_w,
    dht_b,
    dgt_w,
    dgt_b,
    dq,
    dk,
    dv,
    dlr,
    dte,
    dln_w,
    dln_b,
    dh0_w,
    dh0_b,
    dg0_w,
    dg0_b,
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
):
    i_bh = tl.program_id(0)
    i_h = i_bh % H
    i_bh64 = i_bh.to(tl.int64)
    o_i = tl.arange(0, BT)
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    m_dd = m_d[:, None] & m_d[None, :]
    o_dd = o_d[:, None] * D + o_d[None, :]

    b_gamma = tl.load(ln_w + i_h * D + o_d, mask=m_d, other=0.0).to(tl.float32)
    b_beta = tl.load(ln_b + i_h * D + o_d, mask=m_d, other=0.0).to(tl.float32)
    b_te = tl.load(te + o_i, mask=o_i < MB, other=0.0).to(tl.float32)
    te_last = tl.load(te + MB - 1).to(tl.float32)

    # gradient w.r.t. the anchor leaving the current segment, carried backwards
    b_dw = tl.load(dht_w + i_bh64 * D * D + o_dd, mask=m_dd, other=0.0)
    b_db = tl.load(dht_b + i_bh64 * D + o_d, mask=m_d, other=0.0)
    b_dte = tl.zeros([BT], dtype=tl.float32)
    b_dgamma = tl.zeros([BD], dtype=tl.float32)
    b_dbeta = tl.zeros([BD], dtype=tl.float32)

    for i_s in range(0, NS):
        n = NS - 1 - i_s
        o_t = n * MB + o_i - offset
        m_t = (o_i < MB) & (o_t >= 0) & (o_t < T)
        p_tok = i_bh64 * T * D + o_t[:, None] * D + o_d[None, :]
        m_td = m_t[:, None] & m_d[None, :]
        b_q = tl.load(q + p_tok, mask=m_td, other=0.0).to(tl.float32)
        b_k = tl.load(k + p_tok, mask=m_td, other=0.0).to(tl.float32)
        b_v = tl.load(v + p_tok, mask=m_td, other=0.0).to(tl.float32)
        b_do = tl.load(do + p_tok, mask=m_td, other=0.0).to(tl.float32)
        b_lr = tl.load(lr + i_bh64 * T + o_t, mask=m_t, other=0.0).to(tl.float32)
        p_ck = (i_bh64 * NS + n) * D
        b_w = tl.load(ckpt_w + p_ck * D + o_dd, mask=m_dd, other=0.0)
        b_b = tl.load(ckpt_b + p_ck + o_d, mask=m_d, other=0.0)

        slot_end = tl.minimum(n * MB + MB, offset + T)
        p_last = slot_end - 1 - n * MB
        f_done = (slot_end == n * MB + MB).to(tl.float32)

        # ---- recompute the segment's forward
        b_z = tl.dot(b_k, b_w, input_precision=PREC) + b_b[None, :]
        b_xh, b_rstd = _ln_rows(b_z, m_d, D, eps)
        b_gx = (b_xh * b_gamma[None, :] + b_beta[None, :] - (b_v - b_k)) * b_gamma[None, :]
        b_m2 = tl.sum(b_gx * b_xh, axis=1) / D
        b_g = (b_gx - tl.sum(b_gx, axis=1)[:, None] / D - b_xh * b_m2[:, None]) * b_rstd[:, None]
        b_g = tl.where(m_td, b_g, 0.0)
        if CAUSAL:
            b_eta = b_te
            m_a = (o_i[:, None] >= o_i[None, :]) & m_t[None, :]
        else:
            b_eta = tl.zeros([BT], dtype=tl.float32) + tl.load(te + p_last).to(tl.float32)
            m_a = (o_i[:, None] >= 0) & m_t[None, :]
        b_p = tl.dot(b_q, tl.trans(b_k), input_precision=PREC)
        b_a = tl.where(m_a, b_eta[:, None] * b_lr[None, :] * (b_p + 1.0), 0.0)
        b_zb = tl.dot(b_q, b_w, input_precision=PREC) + b_b[None, :] - tl.dot(b_a, b_g, input_precision=PREC)
        b_zs = tl.zeros([BT, BD], dtype=tl.float32)
        if n == 0:
            b_gw = tl.load(g0_w + i_bh64 * D * D + o_dd, mask=m_dd, other=0.0)
            b_gb = tl.load(g0_b + i_bh64 * D + o_d, mask=m_d, other=0.0)
            b_zs = tl.dot(b_q, b_gw, input_precision=PREC) + b_gb[None, :]
            b_zb = b_zb - b_eta[:, None] * b_zs
        b_xb, b_rstdb = _ln_rows(b_zb, m_d, D, eps)
        b_lg = b_g * b_lr[:, None]

        # ---- gradient reaching U = K^T (lr G) (and u): through the stepped anchor, or, for a
        # trailing partial mini-batch, through the returned gradient sum
        b_src_w = b_dw
        b_src_b = b_db
        scale = te_last * 0.0 - te_last
        if slot_end != n * MB + MB:
            b_src_w = tl.load(dgt_w + i_bh64 * D * D + o_dd, mask=m_dd, other=0.0)
            b_src_b = tl.load(dgt_b + i_bh64 * D + o_d, mask=m_d, other=0.0)
            scale = te_last * 0.0 + 1.0
        b_kdx = tl.dot(b_k, b_src_w, input_precision=PREC) + b_src_b[None, :]  # [BT, BD]
        # d te[b-1] from W0' = W0 - te[b-1] (S + U)
        dte_last = -tl.sum(tl.sum(b_lg * b_kdx, axis=1), axis=0)
        b_dg = b_lr[:, None] * (scale * b_kdx)
        b_dlr = tl.sum(b_g * scale * b_kdx, axis=1)
        b_dk = scale * tl.dot(b_lg, tl.trans(b_src_w), input_precision=PREC)

        # ---- output LayerNorm
        b_dgamma += tl.sum(b_do * b_xb, axis=0)
        b_dbeta += tl.sum(b_do, axis=0)
        b_dxb = b_do * b_gamma[None, :]
        b_dzb = (
            b_dxb - tl.sum(b_dxb, axis=1)[:, None] / D - b_xb * (tl.sum(b_dxb * b_xb, axis=1) / D)[:, None]
        ) * b_rstdb[:, None]
        b_dzb = tl.where(m_td, b_dzb, 0.0)
        b_dq = b_do + tl.dot(b_dzb, tl.trans(b_w), input_precision=PREC)
        b_deta = tl.zeros([BT], dtype=tl.float32)
        if n == 0:
            # reloaded: a tensor defined inside the first `if` does not outlive it when compiled
            b_gw = tl.load(g0_w + i_bh64 * D * D + o_dd, mask=m_dd, other=0.0)
            b_gb = tl.load(g0_b + i_bh64 * D + o_d, mask=m_d, other=0.0)
            b_edz = b_eta[:, None] * b_dzb
            b_dq -= tl.dot(b_edz, tl.trans(b_gw), input_precision=PREC)
            b_deta -= tl.sum(b_dzb * b_zs, axis=1)
            dte_last -= tl.sum(tl.sum(b_dw * b_gw, axis=1), axis=0) + tl.sum(b_db * b_gb, axis=0)
            tl.store(
                dg0_w + i_bh64 * D * D + o_dd,
                scale * b_src_w - tl.dot(tl.trans(b_q), b_edz, input_precision=PREC),
                mask=m_dd,
            )
            tl.store(dg0_b + i_bh64 * D + o_d, scale * b_src_b - tl.sum(b_edz, axis=0), mask=m_d)
        b_dte += tl.where(o_i == MB - 1, f_done * dte_last, 0.0)

        # ---- intra-segment attention-like term -(E * (Q K^T + 1)) G
        b_dam = -tl.dot(b_dzb, tl.trans(b_g), input_precision=PREC)  # [BT, BT]
        b_dg -= tl.dot(tl.trans(b_a), b_dzb, input_precision=PREC)
        b_dp = tl.where(m_a, b_dam * b_eta[:, None] * b_lr[None, :], 0.0)
        b_dem = tl.where(m_a, b_dam * (b_p + 1.0), 0.0)
        b_deta += tl.sum(b_dem * b_lr[None, :], axis=1)
        b_dlr += tl.sum(b_dem * b_eta[:, None], axis=0)
        b_dq += tl.dot(b_dp, b_k, input_precision=PREC)
        b_dk += tl.dot(tl.trans(b_dp), b_q, input_precision=PREC)
        if CAUSAL:
            b_dte += tl.where(m_t, b_deta, 0.0)
        else:
            b_dte += tl.where(o_i == p_last, tl.sum(tl.where(m_t, b_deta, 0.0), axis=0), 0.0)

        # ---- second-order LN-L2 backward: G(Z, v - k) -> Z, v, k, gamma, beta
        b_dg = tl.where(m_td, b_dg, 0.0)
        b_gdx = (
            b_dg - tl.sum(b_dg, axis=1)[:, None] / D - b_xh * (tl.sum(b_dg * b_xh, axis=1) / D)[:, None]
        ) * b_rstd[:, None]
        b_gdx = tl.where(m_td, b_gdx, 0.0)
        b_gxh = -(b_m2[:, None] * b_dg + (tl.sum(b_dg * b_xh, axis=1) / D)[:, None] * b_gx) * b_rstd[:, None]
        b_gxh += b_gdx * b_gamma[None, :] * b_gamma[None, :]
        b_grstd = tl.sum(b_dg * b_g, axis=1) / b_rstd
        b_dgamma += tl.sum(b_gdx * (2.0 * b_gamma[None, :] * b_xh + b_beta[None, :] - (b_v - b_k)), axis=0)
        b_dbeta += tl.sum(b_gdx * b_gamma[None, :], axis=0)
        b_dv = -b_gdx * b_gamma[None, :]
        b_dk -= b_dv
        b_gz = (
            b_gxh - tl.sum(b_gxh, axis=1)[:, None] / D - b_xh * (tl.sum(b_gxh * b_xh, axis=1) / D)[:, None]
        ) * b_rstd[:, None]
        b_gz -= (b_grstd * b_rstd * b_rstd / D)[:, None] * b_xh
        b_gz = tl.where(m_td, b_gz, 0.0)
        b_dk += tl.dot(b_gz, tl.trans(b_w), input_precision=PREC)

        # ---- gradient w.r.t. this segment's anchor = the previous segment's output anchor
        b_dw += tl.dot(tl.trans(b_q), b_dzb, input_precision=PREC) + tl.dot(
            tl.trans(b_k), b_gz, input_precision=PREC
        )
        b_db += tl.sum(b_dzb, axis=0) + tl.sum(b_gz, axis=0)

        tl.store(dq + p_tok, b_dq.to(dq.dtype.element_ty), mask=m_td)
        tl.store(dk + p_tok, b_dk.to(dk.dtype.element_ty), mask=m_td)
        tl.store(dv + p_tok, b_dv.to(dv.dtype.element_ty), mask=m_td)
        tl.store(dlr + i_bh64 * T + o_t, b_dlr, mask=m_t)

    tl.store(dh0_w + i_bh64 * D * D + o_dd, b_dw, mask=m_dd)
    tl.store(dh0_b + i_bh64 * D + o_d, b_db, mask=m_d)
    tl.store(dte + i_bh64 * MB + o_i, b_dte, mask=o_i < MB)
    tl.store(dln_w + i_bh64 * D + o_d, b_dgamma, mask=m_d)
    tl.store(dln_b + i_bh64 * D + o_d, b_dbeta, mask=m_d)


def chunk_ttt_linear_bwd_fused(
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
    num_warps: int | None = None,
):
    """Launch the fused backward. Returns dq, dk, dv (dtype of q), dlr [B, H, T] fp32, dte [b] fp32,
    dln_w, dln_b [H, D] fp32, (dW0, db0) and (dgW0, dgb0) for the initial anchor and gradient sum."""
    B, H, T, D = q.shape
    MB = token_eta.shape[0]
    NS = triton.cdiv(offset + T, MB)
    cfg = launch_config(D, q.dtype)
    BT = max(16, triton.next_power_of_2(MB))
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dlr = q.new_empty(B, H, T, dtype=torch.float32)
    dte = q.new_empty(B, H, MB, dtype=torch.float32)
    dln_w = q.new_empty(B, H, D, dtype=torch.float32)
    dln_b = q.new_empty(B, H, D, dtype=torch.float32)
    dh0_w, dh0_b = torch.empty_like(g0[0]), torch.empty_like(g0[1])
    dg0_w, dg0_b = torch.empty_like(g0[0]), torch.empty_like(g0[1])
    chunk_ttt_linear_bwd_kernel_fused[(B * H,)](
        q,
        k,
        v,
        lr,
        token_eta,
        ln_weight,
        ln_bias,
        ckpt[0],
        ckpt[1],
        g0[0],
        g0[1],
        do,
        dht[0],
        dht[1],
        dgt[0],
        dgt[1],
        dq,
        dk,
        dv,
        dlr,
        dte,
        dln_w,
        dln_b,
        dh0_w,
        dh0_b,
        dg0_w,
        dg0_b,
        T,
        offset,
        NS,
        eps,
        H=H,
        D=D,
        BD=cfg["BD"],
        MB=MB,
        BT=BT,
        CAUSAL=causal,
        PREC=cfg["PREC"],
        num_warps=num_warps or cfg["num_warps"],
    )
    return dq, dk, dv, dlr, dte.sum((0, 1)), dln_w.sum(0), dln_b.sum(0), (dh0_w, dh0_b), (dg0_w, dg0_b)
