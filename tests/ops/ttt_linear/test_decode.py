"""Fused single-token decode kernel of TTT-Linear vs the float64 recurrent (primal) form.

Without CUDA the kernel runs under ``TRITON_INTERPRET=1`` (set by tests/conftest.py) at tiny shapes.
"""

from __future__ import annotations

import importlib

import pytest
import torch

pytest.importorskip("triton")

from ttt.ops import ttt_linear  # noqa: E402
from ttt.ops.common import default_token_eta  # noqa: E402
from ttt.ops.ttt_linear.triton.decode import ttt_linear_decode, ttt_linear_decode_  # noqa: E402
from ttt.testing import assert_graph_replay_equals_eager  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def make(B, H, T, D, b, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, scale=1.0: (torch.randn(*s, generator=g, dtype=torch.float64) * scale).to(DEVICE)  # noqa: E731
    return dict(
        q=r(B, H, T, D, scale=0.7), k=r(B, H, T, D, scale=0.7), v=r(B, H, T, D),
        lr=(torch.rand(B, H, T, generator=g, dtype=torch.float64) * 0.5).to(DEVICE),
        ln_weight=1 + r(H, D, scale=0.2), ln_bias=r(H, D, scale=0.2),
        token_eta=(default_token_eta(b).double() * (1 + 0.1 * torch.rand(b, generator=g).double())).to(DEVICE),
        W=r(B, H, D, D, scale=0.4 / D**0.5), bias=r(B, H, D, scale=0.1),
    )  # fmt: skip


def run_recurrent(x, b, sl, state):
    """Float64 recurrent form over tokens ``sl`` from ``state`` (a TTTState or (W, bias))."""
    o, st = ttt_linear(x["q"][:, :, sl], x["k"][:, :, sl], x["v"][:, :, sl], x["lr"][:, :, sl],
                       x["ln_weight"], x["ln_bias"], initial_state=state, token_eta=x["token_eta"],
                       mini_batch_size=b, output_final_state=True, impl="recurrent")  # fmt: skip
    return o, st


def f32(t):
    return t.float().contiguous().clone()


@pytest.mark.parametrize("D,b,prefix", [(16, 4, 0), (24, 8, 5), (32, 16, 13)])
def test_inplace_steps_match_recurrent(D, b, prefix):
    B, H, T = 2, 3, prefix + 2 * b + 1  # crosses two mini-batch boundaries
    x = make(B, H, T, D, b)
    _, st = run_recurrent(x, b, slice(0, prefix), (x["W"], x["bias"]))
    anchor, sums = tuple(map(f32, st.anchor)), tuple(map(f32, st.grad_sum))
    offset = torch.full((B, H), st.offset, dtype=torch.int32, device=DEVICE)
    lw, lb, te = (f32(x[n]) for n in ("ln_weight", "ln_bias", "token_eta"))
    for t in range(prefix, T):
        o_ref, st = run_recurrent(x, b, slice(t, t + 1), st)
        o = ttt_linear_decode_(*(f32(x[n][:, :, t]) for n in ("q", "k", "v", "lr")), lw, lb, te, anchor, sums,
                               offset)  # fmt: skip
        torch.testing.assert_close(o.double(), o_ref[:, :, 0], atol=2e-5, rtol=2e-5)
        assert bool((offset == st.offset).all())
        for got, want in zip(anchor + sums, st.anchor + st.grad_sum):
            torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5)


def test_per_row_offsets():
    """Rows (and heads) at different positions of their mini-batch advance independently."""
    B, H, D, b = 3, 2, 16, 4
    x = make(B, H, 9, D, b, seed=1)
    lw, lb, te = (f32(x[n]) for n in ("ln_weight", "ln_bias", "token_eta"))
    prefixes = [0, 2, 3]  # row r has seen prefixes[r] tokens
    anchors, sums, refs = [], [], []
    for r, p in enumerate(prefixes):
        rows = {n: (t[r : r + 1] if n in ("q", "k", "v", "lr", "W", "bias") else t) for n, t in x.items()}
        _, st0 = run_recurrent(rows, b, slice(0, p), (rows["W"], rows["bias"]))
        o, st1 = run_recurrent(rows, b, slice(p, p + 1), st0)
        anchors.append(st0.anchor)
        sums.append(st0.grad_sum)
        refs.append((o[:, :, 0], st1))
    anchor = tuple(torch.cat([a[i] for a in anchors]).float().contiguous() for i in range(2))
    gsum = tuple(torch.cat([s[i] for s in sums]).float().contiguous() for i in range(2))
    offset = torch.tensor(prefixes, dtype=torch.int32, device=DEVICE)[:, None].repeat(1, H).contiguous()
    tok = [torch.stack([x[n][r, :, p] for r, p in enumerate(prefixes)]).float().contiguous()
           for n in ("q", "k", "v", "lr")]  # fmt: skip
    o = ttt_linear_decode_(*tok, lw, lb, te, anchor, gsum, offset)
    for r, (o_ref, st1) in enumerate(refs):
        torch.testing.assert_close(o[r : r + 1].double(), o_ref, atol=2e-5, rtol=2e-5)
        assert bool((offset[r] == st1.offset).all())
        torch.testing.assert_close(anchor[0][r : r + 1].double(), st1.anchor[0], atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(gsum[0][r : r + 1].double(), st1.grad_sum[0], atol=2e-5, rtol=2e-5)


def test_functional_form_leaves_inputs_and_returns_weights():
    B, H, D, b = 2, 2, 16, 4
    x = make(B, H, 4, D, b, seed=2)
    _, st0 = run_recurrent(x, b, slice(0, 3), (x["W"], x["bias"]))
    o_ref, st1 = run_recurrent(x, b, slice(3, 4), st0)
    anchor, gsum = tuple(map(f32, st0.anchor)), tuple(map(f32, st0.grad_sum))
    before = [t.clone() for t in anchor + gsum]
    tok = [f32(x[n][:, :, 3]) for n in ("q", "k", "v", "lr")]
    o, a1, s1, w1 = ttt_linear_decode(*tok, *(f32(x[n]) for n in ("ln_weight", "ln_bias", "token_eta")),
                                      anchor, gsum, st0.offset, eps=1e-6)  # fmt: skip
    for t, t0 in zip(anchor + gsum, before):
        assert torch.equal(t, t0)
    torch.testing.assert_close(o.double(), o_ref[:, :, 0], atol=2e-5, rtol=2e-5)
    for got, want in zip(a1 + s1 + w1, st1.anchor + st1.grad_sum + st1.weights):
        torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5)


def test_public_op_routes_single_tokens_to_the_decode_kernel(monkeypatch):
    """impl="triton" at a decode step (decode=True: T = 1, causal) uses the decode kernel (one launch),
    whatever the grad mode; a T = 1 call that is not a decode step runs the chunk kernels; a backward
    through the decode kernel raises instead of giving zero gradients."""
    # ``ttt.ops.ttt_linear`` is also the name of the function, so the module is imported by path
    fn = importlib.import_module("ttt.ops.ttt_linear.triton.function")

    calls = []
    real = fn.ttt_linear_decode
    monkeypatch.setattr(fn, "ttt_linear_decode", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = make(1, 2, 6, 16, 4, seed=3)
    f = {n: t.float() for n, t in x.items()}
    kw = dict(token_eta=f["token_eta"], mini_batch_size=4, output_final_state=True)
    o_full, st_full = ttt_linear(f["q"], f["k"], f["v"], f["lr"], f["ln_weight"], f["ln_bias"],
                                 initial_state=(f["W"], f["bias"]), impl="chunk", **kw)  # fmt: skip
    st, outs = (f["W"], f["bias"]), []
    token = lambda t: [f[n][:, :, t : t + 1] for n in ("q", "k", "v", "lr")] + [f["ln_weight"], f["ln_bias"]]  # noqa: E731
    for t in range(6):
        o, st = ttt_linear(*token(t), initial_state=st, impl="triton", decode=True, **kw)
        outs.append(o)
    assert len(calls) == 6
    ttt_linear(*token(0), initial_state=(f["W"], f["bias"]), impl="triton", **kw)
    assert len(calls) == 6
    q = f["q"][:, :, :1].clone().requires_grad_()
    o, _ = ttt_linear(q, *token(0)[1:], initial_state=(f["W"], f["bias"]), impl="triton", decode=True, **kw)
    with pytest.raises(RuntimeError, match="inference-only"):
        o.sum().backward()
    torch.testing.assert_close(torch.cat(outs, 2), o_full, atol=2e-5, rtol=2e-5)
    assert st.offset == st_full.offset
    for got, want in zip(
        st.weights + st.anchor + st.grad_sum, st_full.weights + st_full.anchor + st_full.grad_sum
    ):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_bad_offset_is_refused():
    x = make(1, 2, 1, 16, 4)
    tok = [f32(x[n][:, :, 0]) for n in ("q", "k", "v", "lr")]
    anchor = (f32(x["W"]), f32(x["bias"]))
    sums = tuple(torch.zeros_like(t) for t in anchor)
    with pytest.raises(ValueError, match=r"int32 tensor \[B, H\]"):
        ttt_linear_decode_(*tok, f32(x["ln_weight"]), f32(x["ln_bias"]), f32(x["token_eta"]), anchor, sums,
                           torch.zeros(1, 2, dtype=torch.int64, device=DEVICE))  # fmt: skip
    with pytest.raises(ValueError, match=r"out must be a contiguous \[B, H, D\]"):
        ttt_linear_decode_(*tok, f32(x["ln_weight"]), f32(x["ln_bias"]), f32(x["token_eta"]), anchor, sums,
                           torch.zeros(1, 2, dtype=torch.int32, device=DEVICE),
                           out=torch.empty(1, 2, 8, device=DEVICE))  # fmt: skip
    with pytest.raises(ValueError, match=r"ln_weight must be a contiguous \[H, D\]"):
        ttt_linear_decode_(*tok, f32(x["ln_weight"])[:1], f32(x["ln_bias"]), f32(x["token_eta"]), anchor, sums,
                           torch.zeros(1, 2, dtype=torch.int32, device=DEVICE))  # fmt: skip
    with pytest.raises(ValueError, match="anchor must be 2 contiguous float32"):
        ttt_linear_decode_(*tok, f32(x["ln_weight"]), f32(x["ln_bias"]), f32(x["token_eta"]),
                           (x["W"], x["bias"]), sums, torch.zeros(1, 2, dtype=torch.int32, device=DEVICE))  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 128])
def test_gpu_cuda_graph_replay_equals_eager(D):
    """A captured step replayed N times == N eager steps (state and offsets live on the device)."""
    B, H, b, N = 4, 8, 16, 21
    f = {n: t.float().contiguous() for n, t in make(B, H, N, D, b, seed=4).items()}

    def fresh():
        return (f["W"].clone(), f["bias"].clone(), torch.zeros_like(f["W"]), torch.zeros_like(f["bias"]),
                torch.zeros(B, H, dtype=torch.int32, device="cuda"))  # fmt: skip

    def step(tok, st, out):
        return ttt_linear_decode_(*tok, f["ln_weight"], f["ln_bias"], f["token_eta"], st[:2], st[2:4], st[4],
                                  out=out)  # fmt: skip

    token = lambda t: [f[n][:, :, t].contiguous() for n in ("q", "k", "v", "lr")]  # noqa: E731
    assert_graph_replay_equals_eager(step, fresh, token, N, torch.empty(B, H, D, device="cuda"))
