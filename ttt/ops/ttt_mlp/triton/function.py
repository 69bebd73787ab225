"""Autograd glue for TTT-MLP: the fused Triton forward of ``chunk_fwd.py`` and the two-kernel Triton
backward of ``chunk_bwd.py`` (derivation in ``README.md``).

When a gradient is needed the forward also writes the fast weights at the start of every mini-batch
segment (O((T / b) * (2 D M + M + D)) floats per (batch, head)); the backward recomputes each segment from
them and keeps O(T * (M + D)) fp32 intermediates between its two kernels.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ...triton_shared import chunk_through, decode_through
from ...types import TTTInputs, TTTState
from .chunk_bwd import chunk_ttt_mlp_bwd
from .chunk_fwd import chunk_ttt_mlp_fwd_fused
from .decode import ttt_mlp_decode


class ChunkTTTMLPFunction(torch.autograd.Function):
    """(q, k, v, lr, ln_w, ln_b, token_eta, *anchor(4), *grad_sum(4)) -> (o, *anchor(4), *grad_sum(4)).

    Non-tensor tail: offset, causal, eps, cu_seqlens (None, or ``[N + 1]`` offsets of packed sequences).
    """

    @staticmethod
    def forward(
        ctx, q, k, v, lr, ln_w, ln_b, token_eta, w1, b1, w2, b2, s1, sb1, s2, sb2, offset, causal, eps,
        cu_seqlens,
    ):  # fmt: skip
        q, k, v, lr = (x.contiguous() for x in (q, k, v, lr))
        f32 = lambda x: x.to(torch.float32).contiguous()  # noqa: E731
        ln_w, ln_b, token_eta = map(f32, (ln_w, ln_b, token_eta))
        h0, g0 = tuple(map(f32, (w1, b1, w2, b2))), tuple(map(f32, (s1, sb1, s2, sb2)))
        store = any(ctx.needs_input_grad)
        o, ht, gt, ckpt = chunk_ttt_mlp_fwd_fused(
            q, k, v, lr, token_eta, ln_w, ln_b, h0, g0,
            offset=offset, causal=causal, eps=eps, store_ckpt=store, cu_seqlens=cu_seqlens,
        )  # fmt: skip
        if store:
            ctx.save_for_backward(q, k, v, lr, ln_w, ln_b, token_eta, *g0, *ckpt)
        ctx.offset, ctx.causal, ctx.eps, ctx.cu_seqlens = offset, causal, eps, cu_seqlens
        return (o, *ht, *gt)

    @staticmethod
    @once_differentiable  # the kernels' backward is not itself differentiable: double backward raises
    def backward(ctx, do, *d_state):
        q, k, v, lr, ln_w, ln_b, te, *rest = ctx.saved_tensors
        g0, ckpt = rest[:4], rest[4:]
        # gradients of unused outputs arrive as None; the kernels read dense fp32 tensors
        dense = lambda g, like: torch.zeros_like(like) if g is None else g.float().contiguous()  # noqa: E731
        dht = tuple(dense(g, t) for g, t in zip(d_state[:4], g0))
        dgt = tuple(dense(g, t) for g, t in zip(d_state[4:], g0))
        do = torch.zeros_like(q) if do is None else do.contiguous()
        dq, dk, dv, dlr, dte, dlw, dlb, dh0, dg0 = chunk_ttt_mlp_bwd(
            q, k, v, lr, te, ln_w, ln_b, ckpt, g0, do, dht, dgt,
            offset=ctx.offset, causal=ctx.causal, eps=ctx.eps, cu_seqlens=ctx.cu_seqlens,
        )  # fmt: skip
        return dq, dk, dv, dlr.to(lr.dtype), dlw, dlb, dte, *dh0, *dg0, None, None, None, None


def triton_ttt_mlp(
    x: TTTInputs, state: TTTState, *, causal: bool, eps: float, cu_seqlens: Tensor | None = None
) -> tuple[Tensor, TTTState | None]:
    """TTT-MLP with the fused Triton forward; same arguments and results as ``chunk_ttt_mlp``.

    Args:
        q, k, v: ``[B, H, T, D]`` fp32 / bf16 / fp16 (float64 is refused: the kernel computes in fp32).
        lr: ``[B, H, T]``; ln_weight, ln_bias: ``[H, D]``; token_eta: ``[b]``.
        state: ``TTTState`` expanded to batch B with anchor / grad_sum ``(W1 [B, H, D, M], b1 [B, H, M],
            W2 [B, H, M, D], b2 [B, H, D])``.
        causal: token i answers with the weights after token i (else: after the mini-batch's last token).
        eps: LayerNorm epsilon.
        cu_seqlens: optional ``[N + 1]`` int offsets of N sequences packed along T (q, k, v
            ``[1, H, sum T_n, D]``, lr ``[1, H, sum T_n]``), one program per (sequence, head) in a single
            forward launch; the state then has N rows, every sequence starting at ``state.offset``.
            Default: None.
    Returns: as ``triton_ttt_linear``.
    """
    return chunk_through(ChunkTTTMLPFunction, x, state, causal=causal, eps=eps, cu_seqlens=cu_seqlens)


def decode_ttt_mlp(x: TTTInputs, state: TTTState, *, causal: bool, eps: float) -> tuple[Tensor, TTTState]:
    """The Triton form at a decode step: one causal token ``[B, H, 1, D]`` through the fused decode
    kernel (inference only; same arguments and results as ``triton_ttt_mlp``)."""
    return decode_through(ttt_mlp_decode, x, state, causal=causal, eps=eps)
