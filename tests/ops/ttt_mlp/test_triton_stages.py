"""Stage by stage (STYLE R11): the two backward stages of the Triton TTT-MLP, each against its own float64
torch transcription. The end-to-end tests are in ``test_triton.py``.

With the anchor (the forward's checkpoint) and the inner quantities G1, G2 and X2 held fixed, a segment's
output is (E[i, j] = eta_i lr_j for j <= i, or te[last] lr_j on every column when non-causal)

    Z1b = Q W1 + b1 - eta (Q S1 + s1) - (E * (Q K^T + 1)) G1,   X2b = gelu(Z1b)
    Z2b = X2b W2 + b2 - eta (X2b S2 + s2) - (E * (X2b X2^T + 1)) G2,   o = Q + LN(Z2b)

and ``chunk_ttt_mlp_bwd_local`` must return the gradients of sum(o * do) w.r.t. Q (complete), K and lr
(their output-path parts), Z1b, Z2b, G1, G2, X2, token_eta, the LN parameters and the carried sums, and
X2b itself. The sequential stage, fed with those, must add the gradients of the anchor recurrence alone
(``recurrence_reference``). Without CUDA the kernels run under ``TRITON_INTERPRET=1`` (tests/conftest.py).
"""

from __future__ import annotations

import importlib

import pytest
import torch

pytest.importorskip("triton")

from ttt.ops.common import gelu_tanh, grad_of_inner_loss, layer_norm, ln_l2_grad, split_segments  # noqa: E402
from ttt.testing import assert_stage_matches, stage_case  # noqa: E402

fwd = importlib.import_module("ttt.ops.ttt_mlp.triton.chunk_fwd")
bwd = importlib.import_module("ttt.ops.ttt_mlp.triton.chunk_bwd")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-6
# T, offset, mini-batch, causal: ends on a boundary; ends partial; resumes mid-batch and ends partial
CASES = [(21, 3, 8, True), (21, 0, 8, False), (12, 5, 16, True)]


def make(B, H, T, D, M, b, offset, seed=0):
    x, r = stage_case(B, H, T, D, b, seed, DEVICE)
    x["anchor"] = (r(B, H, D, M, scale=1 / D**0.5), r(B, H, M, scale=0.3), r(B, H, M, D, scale=1 / M**0.5),
                   r(B, H, D, scale=0.1))  # fmt: skip
    on = float(offset > 0)
    x["S"] = tuple(r(*t.shape, scale=0.1) * on for t in x["anchor"])
    return x


def launch_forward(x, offset, causal):
    """The training forward on fp32 copies of ``x``: (fp32 tensors, the op's leading arguments, the carried
    sums, the checkpoints)."""
    f = {key: val.float().contiguous() for key, val in x.items() if torch.is_tensor(val)}
    state = tuple(t.float().contiguous() for t in x["anchor"])
    sums = tuple(t.float().contiguous() for t in x["S"])
    args = (f["q"], f["k"], f["v"], f["lr"], f["te"], f["ln_w"], f["ln_b"])
    _, _, _, ckpt = fwd.chunk_ttt_mlp_fwd_fused(*args, state, sums, offset=offset, causal=causal, eps=EPS,
                                                store_ckpt=True)  # fmt: skip
    return f, args, sums, ckpt


def output_path_reference(x, ckpt, offset, b, causal):
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
        G2 = grad_of_inner_loss(X2 @ W2 + b2[:, :, None], tw, (x["ln_w"] ** 2)[None, :, None], EPS)
        G1 = torch.ops.aten.gelu_backward(G2 @ W2.transpose(-1, -2), Z1, approximate="tanh")
        X2, G1, G2 = leaf(X2), leaf(G1), leaf(G2)
        mask = torch.ones(c, c, dtype=torch.bool, device=DEVICE).tril() if causal else None
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
        loss = loss + ((Q + layer_norm(z2b, lw, lb, EPS)) * x["do"][:, :, sl]).sum()
        for name, t in zip(keep, (z1b, z2b, x2b, G1, G2, X2)):
            keep[name].append(t)
    loss.backward()
    cat = lambda name, grad=True: torch.cat([t.grad if grad else t.detach() for t in keep[name]], 2)  # noqa: E731
    return dict(dq=q.grad, dk=k.grad, dlr=lr.grad, x2b=cat("x2b", grad=False), dz1b=cat("z1b"),
                dg1=cat("G1"), dx2=cat("X2"), dz2b=cat("z2b"), dg2=cat("G2"), dte=te.grad, dln_w=lw.grad,
                dln_b=lb.grad, dg0=tuple(t.grad for t in S))  # fmt: skip


@pytest.mark.parametrize("T,offset,b,causal", CASES, ids=lambda v: str(v))
def test_backward_local_stage_is_the_output_path(monkeypatch, T, offset, b, causal):
    monkeypatch.setattr(bwd, "MAX_BLOCK_M", 16)  # M = 40 in three tiles, the last one partly masked
    x = make(1, 2, T, 16, 40, b, offset, seed=T)
    f, args, sums, ckpt = launch_forward(x, offset, causal)
    loc = bwd.chunk_ttt_mlp_bwd_local(*args, ckpt, sums, f["do"], offset=offset, causal=causal, eps=EPS)
    ref = output_path_reference(x, ckpt, offset, b, causal)
    got = loc._asdict()
    got.update(dte=loc.dte.sum((0, 1, 2)), dln_w=loc.dln_w.sum((0, 2)), dln_b=loc.dln_b.sum((0, 2)))
    if not offset:  # the carried sums are inputs of segment 0 only when the call resumes mid-batch
        got.pop("dg0")
    assert_stage_matches(got, ref)


def recurrence_reference(x, loc, dht, dgt, offset, b):
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
        G2 = ln_l2_grad(X2 @ W2 + b2[:, :, None], v[:, :, sl] - K, lw, lb, EPS)
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


@pytest.mark.parametrize("T,offset,b,causal", CASES + [(5, 3, 16, True)], ids=lambda v: str(v))
def test_backward_sequential_stage_is_the_recurrence(monkeypatch, T, offset, b, causal):
    """The whole backward minus the parallel stage's partials == the recurrence's own gradients, fed with
    the parallel stage's outputs (both launched on the same checkpoints); (5, 3, 16): one partial segment."""
    monkeypatch.setattr(bwd, "MAX_BLOCK_M", 16)  # M = 40 in three tiles, the last one partly masked
    x = make(1, 2, T, 16, 40, b, offset, seed=T + 1)
    f, args, sums, ckpt = launch_forward(x, offset, causal)
    g = torch.Generator().manual_seed(T)
    rand = lambda t: torch.randn(t.shape, generator=g, dtype=torch.float64).to(DEVICE) * 0.3  # noqa: E731
    dht, dgt = tuple(map(rand, x["anchor"])), tuple(map(rand, x["S"]))
    meta = dict(offset=offset, causal=causal, eps=EPS)
    loc = bwd.chunk_ttt_mlp_bwd_local(*args, ckpt, sums, f["do"], **meta)
    dq, dk, dv, dlr, dte, dln_w, dln_b, dh0, dg0 = bwd.chunk_ttt_mlp_bwd(
        *args, ckpt, sums, f["do"], tuple(t.float() for t in dht), tuple(t.float() for t in dgt), **meta
    )
    ref = recurrence_reference(x, loc, dht, dgt, offset, b)
    got = dict(dk=dk.double() - loc.dk, dv=dv, dlr=dlr - loc.dlr, dte=dte - loc.dte.sum((0, 1, 2)),
               dln_w=dln_w - loc.dln_w.sum((0, 2)), dln_b=dln_b - loc.dln_b.sum((0, 2)), dh0=dh0,
               dg0=tuple(a - l for a, l in zip(dg0, loc.dg0)))  # fmt: skip
    # the carried sums' gradient is compared at offset 0 too: kernel and reference both take the zero sums
    assert_stage_matches(got, ref)
