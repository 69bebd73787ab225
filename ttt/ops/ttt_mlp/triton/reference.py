"""Float64 torch references of the Triton TTT-MLP backward stages (the ``*_ref`` beside the
kernels): each computes, by autograd through a plain transcription, what one launcher computes, so a
failure names the stage (tests/ops/ttt_mlp/test_triton_stages.py). ``x`` holds the float64 inputs of
``ttt.testing.stage_case`` plus the anchor and carried gradient sums ``S``; ``ckpt`` the forward's
per-segment anchors.
"""

from __future__ import annotations

import torch

from ...common import gelu_tanh, grad_of_inner_loss, layer_norm, ln_l2_grad, split_segments


def chunk_ttt_mlp_bwd_local_ref(x, ckpt, offset, b, causal, eps: float = 1e-6):
    """Float64 gradients of sum(o * do) through each segment's output path (module docstring)."""
    leaf = lambda t: t.detach().clone().requires_grad_()  # noqa: E731
    q, k, lr, te, lw, lb = map(leaf, (x["q"], x["k"], x["lr"], x["te"], x["ln_w"], x["ln_b"]))
    S = tuple(map(leaf, x["S"]))
    keep = {name: [] for name in ("z1b", "z2b", "x2b", "G1", "G2", "X2")}
    loss = 0.0
    for n, (start, c) in enumerate(split_segments(q.shape[2], offset, b)):
        sl, p0 = slice(start, start + c), offset if n == 0 else 0
        Q, K, LR = q[:, :, sl], k[:, :, sl], lr[:, :, sl]
        W1, b1, W2, b2 = (t[:, :, n].double() for t in ckpt)
        S1, s1, S2, s2 = S if n == 0 else tuple(torch.zeros_like(t) for t in S)
        # the inner quantities at the anchor, as constants
        Z1 = K @ W1 + b1[:, :, None]
        X2 = gelu_tanh(Z1)
        tw = (x["v"][:, :, sl] - K - x["ln_b"][None, :, None]) * x["ln_w"][None, :, None]
        G2 = grad_of_inner_loss(X2 @ W2 + b2[:, :, None], tw, (x["ln_w"] ** 2)[None, :, None], eps)
        G1 = torch.ops.aten.gelu_backward(G2 @ W2.transpose(-1, -2), Z1, approximate="tanh")
        X2, G1, G2 = leaf(X2), leaf(G1), leaf(G2)
        mask = torch.ones(c, c, dtype=torch.bool, device=q.device).tril() if causal else None
        if causal:
            eta = te[p0 : p0 + c][:, None]
            E = eta * LR[:, :, None, :]
        else:
            eta = te[p0 + c - 1]
            E = (eta * LR)[:, :, None, :].expand(*LR.shape[:2], c, c)
        E = E if mask is None else E.masked_fill(~mask, 0)
        z1b = (
            Q @ W1
            + b1[:, :, None]
            - eta * (Q @ S1 + s1[:, :, None])
            - (E * (Q @ K.transpose(-1, -2) + 1)) @ G1
        )
        x2b = gelu_tanh(z1b)
        z2b = x2b @ W2 + b2[:, :, None] - eta * (x2b @ S2 + s2[:, :, None])
        z2b = z2b - (E * (x2b @ X2.transpose(-1, -2) + 1)) @ G2
        for t in (z1b, z2b):
            t.retain_grad()
        loss = loss + ((Q + layer_norm(z2b, lw, lb, eps)) * x["do"][:, :, sl]).sum()
        for name, t in zip(keep, (z1b, z2b, x2b, G1, G2, X2)):
            keep[name].append(t)
    loss.backward()
    cat = lambda name, grad=True: torch.cat([t.grad if grad else t.detach() for t in keep[name]], 2)  # noqa: E731
    return dict(dq=q.grad, dk=k.grad, dlr=lr.grad, x2b=cat("x2b", grad=False), dz1b=cat("z1b"),
                dg1=cat("G1"), dx2=cat("X2"), dz2b=cat("z2b"), dg2=cat("G2"), dte=te.grad, dln_w=lw.grad,
                dln_b=lb.grad, dg0=tuple(t.grad for t in S))  # fmt: skip


def chunk_ttt_mlp_bwd_seq_ref(x, loc, dht, dgt, offset, b, eps: float = 1e-6):
    """Float64 gradients of the surrogate loss the sequential stage differentiates, given the parallel
    stage's output-path gradients ``loc`` (X2b held at its value):

        sum_n <Q W1_n + b1_n, dZ1b_n> + <X2b_n W2_n + b2_n, dZ2b_n> + <G1_n, dG1_n> + <G2_n, dG2_n>
              + <X2_n, dX2_n> + <final anchors, dht> + <returned sums, dgt>

    with the anchors run through the recurrence (full mini-batch: W <- W - te[b-1] (S + sum_j lr_j grad_j),
    S only in segment 0; a trailing partial one returns the sums instead) and the inner quantities
    Z1 = K W1 + b1, X2 = gelu(Z1), G2 = LN-L2 gradient at X2 W2 + b2, G1 = (G2 W2^T) gelu'(Z1)."""
    leaf = lambda t: t.detach().clone().requires_grad_()  # noqa: E731
    k, v, lr, te, lw, lb = map(leaf, (x["k"], x["v"], x["lr"], x["te"], x["ln_w"], x["ln_b"]))
    A0, S = tuple(map(leaf, x["anchor"])), tuple(map(leaf, x["S"]))
    L = {name: getattr(loc, name).double() for name in ("x2b", "dz1b", "dz2b", "dg1", "dg2", "dx2")}
    (W1, b1, W2, b2), sums = A0, tuple(torch.zeros_like(t) for t in S)
    loss = 0.0
    for n, (start, c) in enumerate(split_segments(k.shape[2], offset, b)):
        sl, p0 = slice(start, start + c), offset if n == 0 else 0
        Q, K, LR = x["q"][:, :, sl], k[:, :, sl], lr[:, :, sl, None]
        Z1 = K @ W1 + b1[:, :, None]
        X2 = gelu_tanh(Z1)
        G2 = ln_l2_grad(X2 @ W2 + b2[:, :, None], v[:, :, sl] - K, lw, lb, eps)
        G1 = torch.ops.aten.gelu_backward(G2 @ W2.transpose(-1, -2), Z1, approximate="tanh")
        terms = ((Q @ W1 + b1[:, :, None], "dz1b"), (L["x2b"][:, :, sl] @ W2 + b2[:, :, None], "dz2b"),
                 (G1, "dg1"), (G2, "dg2"), (X2, "dx2"))  # fmt: skip
        loss = loss + sum((t * L[name][:, :, sl]).sum() for t, name in terms)
        U = (
            K.transpose(-1, -2) @ (LR * G1),
            (LR * G1).sum(2),
            X2.transpose(-1, -2) @ (LR * G2),
            (LR * G2).sum(2),
        )
        if n == 0:
            U = tuple(u + s for u, s in zip(U, S))
        if p0 + c == b:
            W1, b1, W2, b2 = (a - te[b - 1] * u for a, u in zip((W1, b1, W2, b2), U))
        else:  # only the last segment can end inside its mini-batch
            sums = U
    finals = zip((W1, b1, W2, b2, *sums), (*dht, *dgt))
    loss = loss + sum((t * g).sum() for t, g in finals)
    loss.backward()
    grad = lambda t: torch.zeros_like(t) if t.grad is None else t.grad  # noqa: E731  (te: no full step)
    return dict(dk=grad(k), dv=grad(v), dlr=grad(lr), dte=grad(te), dln_w=grad(lw), dln_b=grad(lb),
                dh0=tuple(map(grad, A0)), dg0=tuple(map(grad, S)))  # fmt: skip
