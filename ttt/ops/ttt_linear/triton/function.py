"""Autograd glue for the fused TTT-Linear kernels (no math here; see chunk_fwd.py / chunk_bwd.py)."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ...triton_shared import chunk_through, decode_through
from ...types import TTTInputs, TTTState
from .chunk_bwd import chunk_ttt_linear_bwd
from .chunk_fwd import chunk_ttt_linear_fwd_fused
from .decode import ttt_linear_decode


class ChunkTTTLinearFunction(torch.autograd.Function):
    """(q, k, v, lr, ln_w, ln_b, token_eta, W0, b0, gW0, gb0) -> (o, W, b, gW, gb).

    Memory kept for backward: the inputs plus one anchor per mini-batch segment, ``(T / b) * (D^2 + D)``
    numbers per (batch, head) (W in bf16 under bf16 dots, else fp32; ``checkpoint_dtype``); every segment is
    recomputed from its anchor, with the dot rounding the checkpoint's dtype implies.
    """

    @staticmethod
    def forward(ctx, q, k, v, lr, ln_w, ln_b, token_eta, w0, b0, gw0, gb0, offset, causal, eps, cu_seqlens):
        q, k, v, lr = (x.contiguous() for x in (q, k, v, lr))
        f32 = lambda x: x.to(torch.float32).contiguous()  # noqa: E731
        ln_w, ln_b, token_eta, w0, b0, gw0, gb0 = map(f32, (ln_w, ln_b, token_eta, w0, b0, gw0, gb0))
        store = any(ctx.needs_input_grad)
        o, (wt, bt), (gwt, gbt), ckpt = chunk_ttt_linear_fwd_fused(
            q, k, v, lr, token_eta, ln_w, ln_b, (w0, b0), (gw0, gb0),
            offset=offset, causal=causal, eps=eps, store_ckpt=store, cu_seqlens=cu_seqlens,
        )  # fmt: skip
        if store:
            ctx.save_for_backward(q, k, v, lr, ln_w, ln_b, token_eta, gw0, gb0, *ckpt)
        ctx.offset, ctx.causal, ctx.eps, ctx.cu_seqlens = offset, causal, eps, cu_seqlens
        ctx.dtypes = (lr.dtype, ctx.needs_input_grad)
        return o, wt, bt, gwt, gbt

    @staticmethod
    @once_differentiable  # the kernels' backward is not itself differentiable: double backward raises
    def backward(ctx, do, dwt, dbt, dgwt, dgbt):
        q, k, v, lr, ln_w, ln_b, token_eta, gw0, gb0, ckpt_w, ckpt_b = ctx.saved_tensors
        z = lambda g, like: torch.zeros_like(like) if g is None else g.to(torch.float32).contiguous()  # noqa: E731
        do = torch.zeros_like(q) if do is None else do.contiguous()
        dq, dk, dv, dlr, dte, dln_w, dln_b, (dw0, db0), (dgw0, dgb0) = chunk_ttt_linear_bwd(
            q,
            k,
            v,
            lr,
            token_eta,
            ln_w,
            ln_b,
            (ckpt_w, ckpt_b),
            (gw0, gb0),
            do,
            (z(dwt, gw0), z(dbt, gb0)),
            (z(dgwt, gw0), z(dgbt, gb0)),
            offset=ctx.offset,
            causal=ctx.causal,
            eps=ctx.eps,
            cu_seqlens=ctx.cu_seqlens,
        )
        return dq, dk, dv, dlr.to(lr.dtype), dln_w, dln_b, dte, dw0, db0, dgw0, dgb0, None, None, None, None


def triton_ttt_linear(
    x: TTTInputs, state: TTTState, *, causal: bool, eps: float, cu_seqlens: Tensor | None = None
) -> tuple[Tensor, TTTState | None]:
    """TTT-Linear through the fused Triton kernels; same arguments and results as ``chunk_ttt_linear``.

    Args:
        q, k, v: ``[B, H, T, D]`` fp32 / bf16 / fp16 (float64 is refused: the kernels compute in fp32).
        lr: ``[B, H, T]`` inner learning rate per token.
        ln_weight, ln_bias: ``[H, D]`` inner LayerNorm.
        token_eta: ``[b]`` per-position step factor of a mini-batch of size b.
        state: ``TTTState`` expanded to batch B (anchor, grad_sum, offset).
        causal: token i answers with the weights after token i (else: after the mini-batch's last token).
        eps: LayerNorm epsilon.
        cu_seqlens: optional ``[N + 1]`` int offsets of N sequences packed along T (q, k, v
            ``[1, H, sum T_n, D]``, lr ``[1, H, sum T_n]``); the state then has N rows, every sequence
            starting at ``state.offset``. Default: None.
    Returns:
        ``o`` ``[B, H, T, D]`` in ``q.dtype`` and the ``TTTState`` after the last token (packed: after each
        sequence's last token, or None when the sequences end at different positions of a mini-batch,
        which one ``TTTState.offset`` cannot express).
    """
    return chunk_through(ChunkTTTLinearFunction, x, state, causal=causal, eps=eps, cu_seqlens=cu_seqlens)


def decode_ttt_linear(x: TTTInputs, state: TTTState, *, causal: bool, eps: float) -> tuple[Tensor, TTTState]:
    """The Triton form at a decode step: one causal token ``[B, H, 1, D]`` through the fused decode
    kernel (inference only; same arguments and results as ``triton_ttt_linear``)."""
    return decode_through(ttt_linear_decode, x, state, causal=causal, eps=eps)
