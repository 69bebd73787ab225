"""Fused single-token decode kernel of TTT-MLP vs the float64 chunked form called one token at a time.

Without CUDA the kernel runs under ``TRITON_INTERPRET=1`` (set by tests/conftest.py) at tiny shapes.
"""

from __future__ import annotations

import importlib

import pytest
import torch

pytest.importorskip("triton")

from ttt.ops import ttt_mlp  # noqa: E402
from ttt.ops.common import default_token_eta  # noqa: E402
from ttt.ops.ttt_mlp.triton.decode import ttt_mlp_decode, ttt_mlp_decode_  # noqa: E402
from ttt.testing import assert_graph_replay_equals_eager  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = ("W1", "b1", "W2", "b2")


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def make(B, H, T, D, M, b, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, scale=1.0: (torch.randn(*s, generator=g, dtype=torch.float64) * scale).to(DEVICE)  # noqa: E731
    return dict(
        q=r(B, H, T, D, scale=0.7), k=r(B, H, T, D, scale=0.7), v=r(B, H, T, D),
        lr=(torch.rand(B, H, T, generator=g, dtype=torch.float64) * 0.5).to(DEVICE),
        ln_weight=1 + r(H, D, scale=0.2), ln_bias=r(H, D, scale=0.2),
        token_eta=(default_token_eta(b).double() * (1 + 0.1 * torch.rand(b, generator=g).double())).to(DEVICE),
        W1=r(B, H, D, M, scale=1.0 / D**0.5), b1=r(B, H, M, scale=0.3),
        W2=r(B, H, M, D, scale=1.0 / M**0.5), b2=r(B, H, D, scale=0.1),
    )  # fmt: skip


def run_chunk(x, b, sl, state):
    """Float64 chunked form over tokens ``sl`` from ``state`` (a TTTState or the four weights)."""
    return ttt_mlp(x["q"][:, :, sl], x["k"][:, :, sl], x["v"][:, :, sl], x["lr"][:, :, sl], x["ln_weight"],
                   x["ln_bias"], initial_state=state, token_eta=x["token_eta"], mini_batch_size=b,
                   output_final_state=True, impl="chunk")  # fmt: skip


def f32(t):
    return t.float().contiguous().clone()


def close(got, want):
    torch.testing.assert_close(got.double(), want, atol=3e-5, rtol=3e-5)


@pytest.mark.parametrize(
    "D,M,b,prefix,block",
    [(16, 64, 4, 0, None), (24, 40, 8, 5, None), (24, 40, 8, 5, 16)],
    ids=["one-block", "padded-block", "three-blocks"],
)
def test_inplace_steps_match_chunk(monkeypatch, D, M, b, prefix, block):
    """Token by token across two mini-batch boundaries, the state updated in place; with ``block`` = 16 the
    hidden dimension is walked in three blocks (the last one partly masked), each read before it is
    overwritten."""
    if block:
        dec = importlib.import_module("ttt.ops.ttt_mlp.triton.decode")
        real = dec._blocks
        monkeypatch.setattr(dec, "_blocks", lambda D, M: {**real(D, M), "BM": block})
    B, H, T = 2, 2, prefix + 2 * b + 1
    x = make(B, H, T, D, M, b)
    _, st = run_chunk(x, b, slice(0, prefix), tuple(x[n] for n in NAMES))
    anchor, sums = tuple(map(f32, st.anchor)), tuple(map(f32, st.grad_sum))
    offset = torch.full((B, H), st.offset, dtype=torch.int32, device=DEVICE)
    lw, lb, te = (f32(x[n]) for n in ("ln_weight", "ln_bias", "token_eta"))
    for t in range(prefix, T):
        o_ref, st = run_chunk(x, b, slice(t, t + 1), st)
        o = ttt_mlp_decode_(*(f32(x[n][:, :, t]) for n in ("q", "k", "v", "lr")), lw, lb, te, anchor, sums,
                            offset)  # fmt: skip
        close(o, o_ref[:, :, 0])
        assert bool((offset == st.offset).all())
        for got, want in zip(anchor + sums, st.anchor + st.grad_sum):
            close(got, want)


def test_hidden_blocks_loop(monkeypatch):
    """Force several hidden blocks (BM = 16 < M) so both passes loop."""
    dec = importlib.import_module("ttt.ops.ttt_mlp.triton.decode")
    real = dec._blocks
    monkeypatch.setattr(dec, "_blocks", lambda D, M: {**real(D, M), "BM": 16})
    D, M, b = 16, 56, 4
    x = make(1, 2, b, D, M, b, seed=5)
    _, st = run_chunk(x, b, slice(0, b - 1), tuple(x[n] for n in NAMES))
    o_ref, st1 = run_chunk(x, b, slice(b - 1, b), st)  # completes the mini-batch: the anchor steps
    o, a1, s1, w1 = dec.ttt_mlp_decode(*(f32(x[n][:, :, b - 1]) for n in ("q", "k", "v", "lr")),
                                       *(f32(x[n]) for n in ("ln_weight", "ln_bias", "token_eta")),
                                       tuple(map(f32, st.anchor)), tuple(map(f32, st.grad_sum)), st.offset,
                                       eps=1e-6)  # fmt: skip
    close(o, o_ref[:, :, 0])
    for got, want in zip(a1 + s1 + w1, st1.anchor + st1.grad_sum + st1.weights):
        close(got, want)


def test_functional_form_leaves_inputs_and_returns_weights():
    D, M, b = 16, 64, 4
    x = make(2, 2, 4, D, M, b, seed=2)
    _, st0 = run_chunk(x, b, slice(0, 2), tuple(x[n] for n in NAMES))
    o_ref, st1 = run_chunk(x, b, slice(2, 3), st0)
    anchor, gsum = tuple(map(f32, st0.anchor)), tuple(map(f32, st0.grad_sum))
    before = [t.clone() for t in anchor + gsum]
    o, a1, s1, w1 = ttt_mlp_decode(*(f32(x[n][:, :, 2]) for n in ("q", "k", "v", "lr")),
                                   *(f32(x[n]) for n in ("ln_weight", "ln_bias", "token_eta")), anchor, gsum,
                                   st0.offset, eps=1e-6)  # fmt: skip
    assert all(torch.equal(t, t0) for t, t0 in zip(anchor + gsum, before))
    close(o, o_ref[:, :, 0])
    for got, want in zip(a1 + s1 + w1, st1.anchor + st1.grad_sum + st1.weights):
        close(got, want)


def test_per_row_offsets():
    """Rows at different positions of their mini-batch (one of them completing it) advance independently."""
    B, H, D, M, b = 3, 2, 16, 48, 4
    x = make(B, H, b, D, M, b, seed=6)
    lw, lb, te = (f32(x[n]) for n in ("ln_weight", "ln_bias", "token_eta"))
    prefixes, starts, refs = [0, 2, 3], [], []
    for r, p in enumerate(prefixes):
        rows = {
            n: (t[r : r + 1] if t.dim() > 2 and n not in ("ln_weight", "ln_bias") else t)
            for n, t in x.items()
        }
        _, st0 = run_chunk(rows, b, slice(0, p), tuple(rows[n] for n in NAMES))
        refs.append(run_chunk(rows, b, slice(p, p + 1), st0))
        starts.append(st0)
    anchor = tuple(torch.cat([s.anchor[i] for s in starts]).float().contiguous() for i in range(4))
    sums = tuple(torch.cat([s.grad_sum[i] for s in starts]).float().contiguous() for i in range(4))
    offset = torch.tensor(prefixes, dtype=torch.int32, device=DEVICE)[:, None].repeat(1, H).contiguous()
    tok = [torch.stack([x[n][r, :, p] for r, p in enumerate(prefixes)]).float().contiguous()
           for n in ("q", "k", "v", "lr")]  # fmt: skip
    o = ttt_mlp_decode_(*tok, lw, lb, te, anchor, sums, offset)
    for r, (o_ref, st1) in enumerate(refs):
        close(o[r : r + 1], o_ref[:, :, 0])
        assert bool((offset[r] == st1.offset).all())
        for got, want in zip(anchor + sums, st1.anchor + st1.grad_sum):
            close(got[r : r + 1], want)


def test_public_op_routes_single_tokens_to_the_decode_kernel(monkeypatch):
    """impl="triton" at a decode step (decode=True) uses the decode kernel in any grad mode; == one
    chunked call."""
    fn = importlib.import_module("ttt.ops.ttt_mlp.triton.function")
    calls = []
    real = fn.ttt_mlp_decode
    monkeypatch.setattr(fn, "ttt_mlp_decode", lambda *a, **k: calls.append(1) or real(*a, **k))
    b, T = 4, 6
    x = {n: t.float() for n, t in make(1, 2, T, 16, 64, b, seed=3).items()}
    kw = dict(token_eta=x["token_eta"], mini_batch_size=b, output_final_state=True)
    args = lambda s: (x["q"][:, :, s], x["k"][:, :, s], x["v"][:, :, s], x["lr"][:, :, s], x["ln_weight"],  # noqa: E731
                      x["ln_bias"])  # fmt: skip
    o_full, st_full = ttt_mlp(
        *args(slice(0, T)), initial_state=tuple(x[n] for n in NAMES), impl="chunk", **kw
    )
    st, outs = tuple(x[n] for n in NAMES), []
    for t in range(T):
        o, st = ttt_mlp(*args(slice(t, t + 1)), initial_state=st, impl="triton", decode=True, **kw)
        outs.append(o)
    assert len(calls) == T
    torch.testing.assert_close(torch.cat(outs, 2), o_full, atol=3e-5, rtol=3e-5)
    assert st.offset == st_full.offset
    for got, want in zip(
        st.weights + st.anchor + st.grad_sum, st_full.weights + st_full.anchor + st_full.grad_sum
    ):
        torch.testing.assert_close(got, want, atol=3e-5, rtol=3e-5)


@pytest.mark.gpu
def test_gpu_cuda_graph_replay_equals_eager():
    """D = 64, M = 256: a captured step replayed N times == N eager steps."""
    B, H, D, M, b, N = 4, 8, 64, 256, 16, 19
    f = {n: t.float().contiguous() for n, t in make(B, H, N, D, M, b, seed=4).items()}

    def fresh():
        anchor = tuple(f[n].clone() for n in NAMES)
        zeros = tuple(torch.zeros_like(t) for t in anchor)
        return anchor + zeros + (torch.zeros(B, H, dtype=torch.int32, device="cuda"),)

    def step(tok, st, out):
        return ttt_mlp_decode_(*tok, f["ln_weight"], f["ln_bias"], f["token_eta"], st[:4], st[4:8], st[8],
                               out=out)  # fmt: skip

    token = lambda t: [f[n][:, :, t].contiguous() for n in ("q", "k", "v", "lr")]  # noqa: E731
    assert_graph_replay_equals_eager(step, fresh, token, N, torch.empty(B, H, D, device="cuda"))
