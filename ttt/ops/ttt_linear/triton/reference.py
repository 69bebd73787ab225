"""Float64 torch references of the Triton TTT-Linear backward stages (the ``*_ref`` beside the
kernels): each computes, by autograd through a plain transcription, what one launcher computes, so a
failure names the stage (tests/ops/ttt_linear/test_triton_stages.py). ``x`` holds the float64 inputs of
``ttt.testing.stage_case`` plus the anchor and carried gradient sums ``S``; ``ckpt`` the forward's
per-segment anchors.
"""

from __future__ import annotations

import torch

from ...common import causal_eta_scores, layer_norm, ln_l2_grad, split_segments


def chunk_ttt_linear_bwd_local_ref(x, ckpt, offset, b, causal, eps: float = 1e-6):
    """Float64 gradients of sum(o * do) through each segment's output path, with the segment's anchor
    (the checkpoint) and its inner gradient G as constants: what the parallel backward stage computes.

    Per segment: Zbar = Q W0 + b0 - eta (Q S_W + S_b) - A G, o = Q + LN(Zbar), with A = E * (Q K^T + 1),
    E[i, j] = eta_i lr_j for j <= i (causal) or te[last] lr_j on every column (non-causal)."""
    leaf = lambda t: t.detach().clone().requires_grad_()  # noqa: E731
    q, k, lr, te, lw, lb, sw, sb = map(
        leaf, (x["q"], x["k"], x["lr"], x["te"], x["ln_w"], x["ln_b"], *x["S"])
    )
    zbars, grads_g, loss = [], [], 0.0
    for n, (start, c) in enumerate(split_segments(q.shape[2], offset, b)):
        sl, p0 = slice(start, start + c), offset if n == 0 else 0
        Q, K, LR = q[:, :, sl], k[:, :, sl], lr[:, :, sl]
        W0, b0 = ckpt[0][:, :, n].double(), ckpt[1][:, :, n].double()
        G = leaf(ln_l2_grad(K @ W0 + b0[:, :, None], x["v"][:, :, sl] - K, x["ln_w"], x["ln_b"], eps))
        S_W, S_b = (sw, sb) if n == 0 else (torch.zeros_like(sw), torch.zeros_like(sb))
        if causal:
            eta = te[p0 : p0 + c][:, None]
            A = causal_eta_scores(Q, K, LR, te[p0 : p0 + c])
        else:
            eta = te[p0 + c - 1]
            A = (Q @ K.transpose(-1, -2) + 1) * (eta * LR)[:, :, None, :]
        zbar = Q @ W0 + b0[:, :, None] - eta * (Q @ S_W + S_b[:, :, None]) - A @ G
        zbar.retain_grad()
        loss = loss + ((Q + layer_norm(zbar, lw, lb, eps)) * x["do"][:, :, sl]).sum()
        zbars.append(zbar)
        grads_g.append(G)
    loss.backward()
    cat = lambda ts: torch.cat([t.grad for t in ts], dim=2)  # noqa: E731
    return dict(dq=q.grad, dk=k.grad, dlr=lr.grad, dzb=cat(zbars), dgl=cat(grads_g), dte=te.grad,
                dln_w=lw.grad, dln_b=lb.grad, dgW0=sw.grad, dgb0=sb.grad)  # fmt: skip


def chunk_ttt_linear_bwd_seq_ref(x, dzb, dgl, dht, dgt, offset, b, eps: float = 1e-6):
    """Float64 gradients of the surrogate loss the sequential stage differentiates:

        sum_n <Q_n W_n + b_n, dZbar_n> + <G_n, dG_local_n> + <final anchor, dht> + <returned sum, dgt>

    where (W_n, b_n) is the anchor at the start of segment n, run through the recurrence (full mini-batch:
    W_{n+1} = W_n - te[b-1] (S + K^T (lr G_n)), S only in segment 0; a trailing partial one returns the
    sum instead) and G_n the LN-L2 inner gradient at K_n W_n + b_n. q is a constant here: its gradient is
    all output path (the parallel stage's)."""
    leaf = lambda t: t.detach().clone().requires_grad_()  # noqa: E731
    k, v, lr, te, lw, lb, W0, b0, sw, sb = map(
        leaf, (x["k"], x["v"], x["lr"], x["te"], x["ln_w"], x["ln_b"], x["W"], x["bias"], *x["S"])
    )
    W, bias = W0, b0
    loss, gsum = 0.0, (torch.zeros_like(sw), torch.zeros_like(sb))
    for n, (start, c) in enumerate(split_segments(k.shape[2], offset, b)):
        sl, p0 = slice(start, start + c), offset if n == 0 else 0
        Q, K, LR = x["q"][:, :, sl], k[:, :, sl], lr[:, :, sl]
        G = ln_l2_grad(K @ W + bias[:, :, None], v[:, :, sl] - K, lw, lb, eps)
        loss = loss + ((Q @ W + bias[:, :, None]) * dzb[:, :, sl]).sum() + (G * dgl[:, :, sl]).sum()
        U = K.transpose(-1, -2) @ (LR[..., None] * G)
        u = (LR[..., None] * G).sum(2)
        if n == 0:
            U, u = U + sw, u + sb
        if p0 + c == b:
            W, bias = W - te[b - 1] * U, bias - te[b - 1] * u
        else:  # only the last segment can end inside its mini-batch
            gsum = (U, u)
    finals = ((W, dht[0]), (bias, dht[1]), (gsum[0], dgt[0]), (gsum[1], dgt[1]))
    loss = loss + sum((t * g).sum() for t, g in finals)
    loss.backward()
    grad = lambda t: torch.zeros_like(t) if t.grad is None else t.grad  # noqa: E731  (te: no full step)
    return dict(dk=grad(k), dv=grad(v), dlr=grad(lr), dte=grad(te), dln_w=grad(lw), dln_b=grad(lb), dW0=grad(W0),
                db0=grad(b0), dgW0=grad(sw), dgb0=grad(sb))  # fmt: skip
