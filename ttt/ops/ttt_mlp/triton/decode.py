"""Fused single-token decode step of TTT-MLP: one launch, no host work, CUDA-graph friendly.

One program per (batch, head). The fast model is ``x + LN(gelu(x W1 + b1) W2 + b2)`` with W1 [D, M],
W2 [M, D]; at D = 64, M = 256 the anchor and the gradient sums are 256 KB of fp32, more than a
program's registers, so the hidden dimension is walked in blocks of BM columns (of W1) / rows (of W2),
twice. All arithmetic is fp32. With the anchor (W1, b1, W2, b2), gradient sums S = (S1, s1, S2, s2) and
``eta = token_eta[offset]``:

    pass 1, per hidden block:  z1 = k W1 + b1,  x2 = gelu(z1),  z2 += x2 W2      (z2 starts at b2)
    g2 = lr * d/dz2 0.5 ||LN(z2) - (v - k)||^2,   s2 += g2
    pass 2, per hidden block (z1, x2 recomputed from the still unchanged block of W1):
        g1 = (W2 g2) * gelu'(z1),   S1 += k^T g1,  s1 += g1,  S2 += x2^T g2
        zq1 = q W1 + b1 - eta (q S1 + s1),  zq2 += gelu(zq1) (W2 - eta S2)       (zq2 starts at b2 - eta s2)
        mini-batch complete: W1 -= te[b-1] S1, ... and S = 0 (this block's tiles are written here)
    o = q + LN(zq2)

Pass 2 writes block j of the state only after reading it, and no later block reads it, so the update
is safe in place. Same math as ``ttt_mlp(..., impl="chunk")`` for one token.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ...triton_shared import _decode_token, _ln_l2_grad_vec, _ln_vec, check_decode
from .chunk_fwd import _gelu_tanh


@triton.heuristics(
    {
        "OFFSET_PTR": lambda args: args["offs"] is not None,
        "STORE_WEIGHTS": lambda args: args["wt_w1"] is not None,
    }
)
@triton.jit(do_not_specialize=["off_scalar"])
def ttt_mlp_decode_kernel(
    q, k, v, lr, te, ln_w, ln_b, w1, b1, w2, b2, s1, sb1, s2, sb2,
    w1_out, b1_out, w2_out, b2_out, s1_out, sb1_out, s2_out, sb2_out, wt_w1, wt_b1, wt_w2, wt_b2,
    offs, o, off_scalar, eps,
    H: tl.constexpr, D: tl.constexpr, M: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr,
    MB: tl.constexpr, INPLACE: tl.constexpr, OFFSET_PTR: tl.constexpr, STORE_WEIGHTS: tl.constexpr,
):  # fmt: skip
    i_bh = tl.program_id(0)
    i_h = i_bh % H
    i_bh64 = i_bh.to(tl.int64)
    o_d = tl.arange(0, BD)
    o_m = tl.arange(0, BM)
    m_d = o_d < D
    p_d = i_bh64 * D + o_d
    base_dm = i_bh64 * D * M  # W1 [D, M] and W2 [M, D] of this (batch, head)
    base_m = i_bh64 * M

    off, eta, te_last, b_q, b_k, b_v, b_lr, b_gamma, b_beta = _decode_token(
        (q, k, v, lr, ln_w, ln_b), te, offs, off_scalar, i_bh, i_h, o_d, m_d, D, MB, OFFSET_PTR
    )
    done = off == MB - 1
    if INPLACE:  # in place, an anchor that does not move needs no write
        write_anchor = done
    else:
        write_anchor = off >= 0
    step = tl.where(done, te_last, 0.0)  # anchor step of a completed mini-batch
    keep = tl.where(done, 0.0, 1.0)  # the gradient sums restart after it
    b_b2 = tl.load(b2 + p_d, mask=m_d, other=0.0)

    # pass 1: the inner model's output at the anchor
    b_z2 = b_b2
    for j in range(0, M, BM):
        m_m = j + o_m < M
        m_dm = m_d[:, None] & m_m[None, :]
        p_dm = base_dm + o_d[:, None] * M + (j + o_m)[None, :]  # W1[:, j:j+BM] as [BD, BM]
        p_md = base_dm + (j + o_m)[None, :] * D + o_d[:, None]  # W2[j:j+BM, :] transposed, [BD, BM]
        b_z1 = tl.sum(b_k[:, None] * tl.load(w1 + p_dm, mask=m_dm, other=0.0), axis=0)
        b_z1 += tl.load(b1 + base_m + j + o_m, mask=m_m, other=0.0)
        b_x2, _ = _gelu_tanh(b_z1)
        b_z2 += tl.sum(tl.load(w2 + p_md, mask=m_dm, other=0.0) * tl.where(m_m, b_x2, 0.0)[None, :], axis=1)

    # the LN + L2 gradient at z2, weighted by this token's lr
    b_g2 = _ln_l2_grad_vec(b_z2, b_v - b_k, b_gamma, b_beta, m_d, D, eps) * b_lr
    b_sb2 = tl.load(sb2 + p_d, mask=m_d, other=0.0) + b_g2
    b_zq2 = b_b2 - eta * b_sb2

    # pass 2: the gradient sums, the query, the anchor step, block by block
    for j in range(0, M, BM):
        m_m = j + o_m < M
        m_dm = m_d[:, None] & m_m[None, :]
        p_dm = base_dm + o_d[:, None] * M + (j + o_m)[None, :]
        p_md = base_dm + (j + o_m)[None, :] * D + o_d[:, None]
        p_m = base_m + j + o_m
        b_w1 = tl.load(w1 + p_dm, mask=m_dm, other=0.0)
        b_b1 = tl.load(b1 + p_m, mask=m_m, other=0.0)
        b_w2t = tl.load(w2 + p_md, mask=m_dm, other=0.0)  # W2 block transposed: [BD, BM]
        b_z1 = tl.sum(b_k[:, None] * b_w1, axis=0) + b_b1
        b_x2, b_dx2 = _gelu_tanh(b_z1)
        b_g1 = tl.where(m_m, tl.sum(b_w2t * b_g2[:, None], axis=0) * b_dx2, 0.0)
        b_s1 = tl.load(s1 + p_dm, mask=m_dm, other=0.0) + b_k[:, None] * b_g1[None, :]
        b_sb1 = tl.load(sb1 + p_m, mask=m_m, other=0.0) + b_g1
        b_s2t = tl.load(s2 + p_md, mask=m_dm, other=0.0) + b_g2[:, None] * b_x2[None, :]
        b_zq1 = tl.sum(b_q[:, None] * (b_w1 - eta * b_s1), axis=0) + b_b1 - eta * b_sb1
        b_xq2, _ = _gelu_tanh(b_zq1)
        b_zq2 += tl.sum((b_w2t - eta * b_s2t) * tl.where(m_m, b_xq2, 0.0)[None, :], axis=1)
        if STORE_WEIGHTS:  # the token's own weights (TTTState.weights of the functional form)
            tl.store(wt_w1 + p_dm, b_w1 - eta * b_s1, mask=m_dm)
            tl.store(wt_b1 + p_m, b_b1 - eta * b_sb1, mask=m_m)
            tl.store(wt_w2 + p_md, b_w2t - eta * b_s2t, mask=m_dm)
        if write_anchor:
            tl.store(w1_out + p_dm, b_w1 - step * b_s1, mask=m_dm)
            tl.store(b1_out + p_m, b_b1 - step * b_sb1, mask=m_m)
            tl.store(w2_out + p_md, b_w2t - step * b_s2t, mask=m_dm)
        tl.store(s1_out + p_dm, keep * b_s1, mask=m_dm)
        tl.store(sb1_out + p_m, keep * b_sb1, mask=m_m)
        tl.store(s2_out + p_md, keep * b_s2t, mask=m_dm)

    if STORE_WEIGHTS:
        tl.store(wt_b2 + p_d, b_b2 - eta * b_sb2, mask=m_d)
    tl.store(b2_out + p_d, b_b2 - step * b_sb2, mask=m_d)
    tl.store(sb2_out + p_d, keep * b_sb2, mask=m_d)
    b_xq, _ = _ln_vec(b_zq2, m_d, D, eps)
    tl.store(o + p_d, (b_q + b_xq * b_gamma + b_beta).to(o.dtype.element_ty), mask=m_d)
    if OFFSET_PTR:
        tl.store(offs + i_bh, tl.where(done, 0, off + 1))


def _blocks(D: int, M: int) -> dict:
    BD = max(16, triton.next_power_of_2(D))
    # a [BD, BM] fp32 tile per state tensor; ~4K elements keeps the three tiles of pass 2 in registers
    BM = max(16, min(triton.next_power_of_2(M), 4096 // BD))
    return dict(BD=BD, BM=BM, num_warps=4 if BD <= 64 else 8)


def _hidden(anchor) -> int:
    """M from b1 ``[B, H, M]``; -1 (refused by ``check_decode``) when the anchor is not four tensors."""
    return anchor[1].shape[-1] if len(anchor) == 4 and anchor[1].dim() == 3 else -1


def _shapes(D: int, M: int):
    return ((D, M), (M,), (M, D), (D,))


def ttt_mlp_decode_(
    q: Tensor, k: Tensor, v: Tensor, lr: Tensor, ln_weight: Tensor, ln_bias: Tensor, token_eta: Tensor,
    anchor: tuple[Tensor, Tensor, Tensor, Tensor], grad_sum: tuple[Tensor, Tensor, Tensor, Tensor],
    offset: Tensor, *, eps: float = 1e-6, out: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """One causal TTT-MLP token for every (batch, head), updating the state **in place**.

    No host synchronisation and no allocation (with ``out``): capturable in a CUDA graph.

    Args:
        q, k, v: ``[B, H, D]`` (or ``[B, H, 1, D]``), contiguous; lr ``[B, H]``.
        ln_weight, ln_bias: ``[H, D]``; token_eta: ``[b]``.
        anchor, grad_sum: ``(W1 [B, H, D, M], b1 [B, H, M], W2 [B, H, M, D], b2 [B, H, D])`` contiguous
            fp32; updated in place.
        offset: ``[B, H]`` int32, tokens of the current mini-batch already seen, in ``[0, b)`` (not checked:
            reading it on the host would synchronise); advanced in place.
        out: optional ``[B, H, D]`` output buffer (dtype of q).
    Returns:
        ``o`` ``[B, H, D]``.
    """
    B, H = lr.shape[:2]
    D, M = ln_weight.shape[-1], _hidden(anchor)
    check_decode(q, k, v, lr, ln_weight, ln_bias, token_eta, anchor, grad_sum, _shapes(D, M), offset, out)
    o = torch.empty((B, H, D), dtype=q.dtype, device=q.device) if out is None else out
    ttt_mlp_decode_kernel[(B * H,)](
        q, k, v, lr, token_eta, ln_weight, ln_bias, *anchor, *grad_sum, *anchor, *grad_sum,
        None, None, None, None, offset, o, 0, eps, H=H, D=D, M=M, MB=token_eta.shape[0], INPLACE=True,
        **_blocks(D, M),
    )  # fmt: skip
    return o


def ttt_mlp_decode(
    q: Tensor, k: Tensor, v: Tensor, lr: Tensor, ln_weight: Tensor, ln_bias: Tensor, token_eta: Tensor,
    anchor: tuple[Tensor, ...], grad_sum: tuple[Tensor, ...], offset: int, *, eps: float,
) -> tuple[Tensor, tuple[Tensor, ...], tuple[Tensor, ...], tuple[Tensor, ...]]:  # fmt: skip
    """Functional form of ``ttt_mlp_decode_``: ``(o [B, H, D], anchor, grad_sum, weights)`` after the
    token, in new tensors (the inputs are left alone); ``offset`` is a host int shared by every row."""
    B, H = lr.shape[:2]
    D, M = ln_weight.shape[-1], _hidden(anchor)
    check_decode(q, k, v, lr, ln_weight, ln_bias, token_eta, anchor, grad_sum, _shapes(D, M))
    o = torch.empty((B, H, D), dtype=q.dtype, device=q.device)
    new_anchor, new_sum, weights = (tuple(torch.empty_like(t) for t in anchor) for _ in range(3))
    ttt_mlp_decode_kernel[(B * H,)](
        q, k, v, lr, token_eta, ln_weight, ln_bias, *anchor, *grad_sum, *new_anchor, *new_sum, *weights,
        None, o, offset, eps, H=H, D=D, M=M, MB=token_eta.shape[0], INPLACE=False, **_blocks(D, M),
    )  # fmt: skip
    return o, new_anchor, new_sum, weights
