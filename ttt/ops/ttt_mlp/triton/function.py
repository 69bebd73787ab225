"""Autograd glue for TTT-MLP: Triton forward, backward by per-mini-batch recomputation.

The forward is the fused kernel of ``chunk_fwd.py``; when a gradient is needed it also writes the fast
weights at the start of every mini-batch segment (memory O((T / b) * (2 D M + M + D)) per (batch, head)).
The backward is **not** a Triton kernel: it walks the segments in reverse, re-runs each one in PyTorch
from its checkpointed anchor (the same dual-form equations as the kernel) and back-propagates through it
with autograd. It is exact, but it runs at the speed of the chunked PyTorch form.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...common import layer_norm
from ...types import TTTState
from ..chunk import dual_segment
from .chunk_fwd import chunk_ttt_mlp_fwd_fused


def _segment(Q, K, V, LR, te_c, anchor, S, lw, lb, eps, causal):
    """One segment in PyTorch (tokens at positions te_c of their mini-batch). Returns (o, S + U)."""
    w2, TW = (lw * lw)[None, :, None], (V - K - lb[None, :, None]) * lw[None, :, None]
    Z2b, new = dual_segment(Q, K, LR, TW, te_c, anchor, S, w2, eps, causal)
    return Q + layer_norm(Z2b, lw, lb, eps), new


class ChunkTTTMLPFunction(torch.autograd.Function):
    """(q, k, v, lr, ln_w, ln_b, token_eta, *anchor(4), *grad_sum(4)) -> (o, *anchor(4), *grad_sum(4))."""

    @staticmethod
    def forward(
        ctx, q, k, v, lr, ln_w, ln_b, token_eta, w1, b1, w2, b2, s1, sb1, s2, sb2, offset, causal, eps
    ):
        q, k, v, lr = (x.contiguous() for x in (q, k, v, lr))
        f32 = lambda x: x.to(torch.float32).contiguous()  # noqa: E731
        ln_w, ln_b, token_eta = map(f32, (ln_w, ln_b, token_eta))
        h0, g0 = tuple(map(f32, (w1, b1, w2, b2))), tuple(map(f32, (s1, sb1, s2, sb2)))
        store = any(ctx.needs_input_grad)
        o, ht, gt, ckpt = chunk_ttt_mlp_fwd_fused(
            q,
            k,
            v,
            lr,
            token_eta,
            ln_w,
            ln_b,
            h0,
            g0,
            offset=offset,
            causal=causal,
            eps=eps,
            store_ckpt=store,
        )
        if store:
            ctx.save_for_backward(q, k, v, lr, ln_w, ln_b, token_eta, *g0, *ckpt)
        ctx.offset, ctx.causal, ctx.eps = offset, causal, eps
        return (o, *ht, *gt)

    @staticmethod
    def backward(ctx, do, *d_state):
        q, k, v, lr, ln_w, ln_b, te, *rest = ctx.saved_tensors
        g0, ckpt = rest[:4], rest[4:]
        offset, causal, eps = ctx.offset, ctx.causal, ctx.eps
        T, mb = q.shape[2], te.shape[0]
        zero = lambda g, like: torch.zeros_like(like) if g is None else g.float()  # noqa: E731
        d_anchor = [zero(g, t) for g, t in zip(d_state[:4], g0)]
        d_sum = [zero(g, t) for g, t in zip(d_state[4:], g0)]
        do = torch.zeros_like(q) if do is None else do
        grads = {name: torch.zeros_like(x, dtype=torch.float32) for name, x in (("q", q), ("k", k), ("v", v))}
        dlr, dlw, dlb, dte = torch.zeros_like(lr, dtype=torch.float32), 0, 0, 0
        ns = (offset + T + mb - 1) // mb
        d_s0 = None
        for n in reversed(range(ns)):
            t0, t1 = max(0, n * mb - offset), min(T, (n + 1) * mb - offset)
            p0, done = t0 + offset - n * mb, t1 + offset - n * mb == mb
            with torch.enable_grad():
                ins = [x[:, :, t0:t1].float().detach().requires_grad_() for x in (q, k, v, lr)]
                lw_, lb_, te_ = (x.detach().requires_grad_() for x in (ln_w, ln_b, te))
                anchor = [c[:, :, n].detach().requires_grad_() for c in ckpt]
                S = [g.detach().requires_grad_() if n == 0 else torch.zeros_like(g) for g in g0]
                o_n, new = _segment(*ins, te_[p0 : p0 + t1 - t0], anchor, S, lw_, lb_, eps, causal)
                outs, gouts = [o_n], [do[:, :, t0:t1].float()]
                if done:
                    # the next anchor is anchor - te[b-1] * (S + U); the gradient sum restarts at zero
                    outs += [a - te_[-1] * s for a, s in zip(anchor, new)]
                    gouts += d_anchor
                else:
                    outs += list(anchor) + list(new)
                    gouts += d_anchor + d_sum
                wrt = ins + [lw_, lb_, te_] + anchor + (S if n == 0 else [])
                g = torch.autograd.grad(outs, wrt, gouts, allow_unused=True)
            g = [torch.zeros_like(w) if gi is None else gi for gi, w in zip(g, wrt)]
            for i, name in enumerate(("q", "k", "v")):
                grads[name][:, :, t0:t1] = g[i]
            dlr[:, :, t0:t1] = g[3]
            dlw, dlb, dte = dlw + g[4], dlb + g[5], dte + g[6]
            d_anchor = list(g[7:11])
            if n == 0:
                d_s0 = g[11:15]
        return (
            grads["q"].to(q.dtype), grads["k"].to(k.dtype), grads["v"].to(v.dtype), dlr.to(lr.dtype),
            dlw, dlb, dte, *d_anchor, *d_s0, None, None, None,
        )  # fmt: skip


def triton_ttt_mlp(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lr: Tensor,
    ln_weight: Tensor,
    ln_bias: Tensor,
    token_eta: Tensor,
    state: TTTState,
    *,
    causal: bool,
    eps: float,
) -> tuple[Tensor, TTTState]:
    """TTT-MLP with the fused Triton forward; same arguments and results as ``chunk_ttt_mlp``.

    Args:
        q, k, v: ``[B, H, T, D]`` fp32 / bf16 / fp16 (float64 is refused: the kernel computes in fp32).
        lr: ``[B, H, T]``; ln_weight, ln_bias: ``[H, D]``; token_eta: ``[b]``.
        state: ``TTTState`` expanded to batch B with anchor / grad_sum ``(W1 [B, H, D, M], b1 [B, H, M],
            W2 [B, H, M, D], b2 [B, H, D])``.
    Returns:
        ``o`` ``[B, H, T, D]`` in ``q.dtype`` and the ``TTTState`` after the last token.
    """
    if q.dtype == torch.float64:
        raise TypeError("the Triton TTT-MLP kernel computes in float32; use impl='chunk' for float64 inputs")
    mb, T = token_eta.shape[0], q.shape[2]
    if T == 0:
        return q.clone(), state
    out = ChunkTTTMLPFunction.apply(
        q, k, v, lr, ln_weight, ln_bias, token_eta, *state.anchor, *state.grad_sum, state.offset, causal, eps
    )
    o, anchor, grad_sum = out[0], tuple(out[1:5]), tuple(out[5:9])
    offset = (state.offset + T) % mb
    te = token_eta.to(torch.float32)
    weights = anchor if offset == 0 else tuple(a - te[offset - 1] * s for a, s in zip(anchor, grad_sum))
    return o, TTTState(weights, anchor, grad_sum, offset, mb, state.variant)
