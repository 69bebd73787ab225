"""Fused Triton TTT-Linear (``impl="triton"``) vs the chunked dual form in float64: output, final state and
every gradient (q, k, v, lr, ln params, token_eta, initial anchor and gradient sum).

Without CUDA the kernels run under ``TRITON_INTERPRET=1`` at tiny shapes (fp32 / fp16; the interpreter
cannot do bf16). Tests marked ``gpu`` take larger shapes and bf16 and poison fresh buffers with NaN.
"""

from __future__ import annotations

import importlib

import pytest
import torch

# without CUDA the kernels run under Triton's interpreter: tests/conftest.py sets TRITON_INTERPRET=1
# before any module imports Triton (Triton decides when a kernel module is first imported)
pytest.importorskip("triton")

from ttt.ops import ttt_linear  # noqa: E402
from ttt.ops.common import default_token_eta  # noqa: E402
from ttt.ops.types import TTTInputs, TTTState  # noqa: E402
from ttt.testing import BudgetChecks, random_projection_grads  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    """impl="triton" on CPU tensors is refused unless TRITON_INTERPRET=1."""
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")


gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def make_case(B, H, T, D, *, b=16, offset=0, dtype=torch.float32, seed=0, device=DEVICE):
    """Leaf tensors (float64 masters) for one call that resumes ``offset`` tokens into a mini-batch."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, scale=1.0: torch.randn(*s, generator=g, dtype=torch.float64) * scale  # noqa: E731
    leaves = {
        "q": r(B, H, T, D, scale=0.7), "k": r(B, H, T, D, scale=0.7), "v": r(B, H, T, D),
        "lr": torch.rand(B, H, T, generator=g, dtype=torch.float64) * 0.5,
        "ln_weight": 1 + r(H, D, scale=0.2), "ln_bias": r(H, D, scale=0.2),
        "token_eta": default_token_eta(b).double() * (1 + 0.1 * r(b).abs()),
        "W": r(B, H, D, D, scale=0.3 / D**0.5), "b": r(B, H, D, scale=0.1),
        "gW": r(B, H, D, D, scale=0.3 / D**0.5) * (offset > 0), "gb": r(B, H, D, scale=0.1) * (offset > 0),
    }  # fmt: skip
    return {key: val.to(device) for key, val in leaves.items()}, dict(b=b, offset=offset, dtype=dtype)


def run(leaves, meta, *, impl, dtype, causal, grad=True):
    """Call the public op with ``leaves`` cast to ``dtype`` (state in fp32, or fp64 for fp64)."""
    sd = torch.float64 if dtype == torch.float64 else torch.float32
    x = {}
    for key, val in leaves.items():
        want = dtype if key in ("q", "k", "v") else sd
        # at offset 0 the gradient sum of a valid state is zero and not an input of the math (the chunked
        # form drops it for full mini-batches), so its gradient is not compared there
        wants_grad = grad and not (key in ("gW", "gb") and meta["offset"] == 0)
        x[key] = val.to(want).detach().requires_grad_(wants_grad)
    anchor, gsum = (x["W"], x["b"]), (x["gW"], x["gb"])
    weights = tuple(a - x["token_eta"][meta["offset"] - 1] * s for a, s in zip(anchor, gsum))
    state = TTTState(weights, anchor, gsum, meta["offset"], meta["b"], "ttt_linear")
    o, final = ttt_linear(
        x["q"], x["k"], x["v"], x["lr"], x["ln_weight"], x["ln_bias"], initial_state=state,
        token_eta=x["token_eta"], mini_batch_size=meta["b"], causal=causal, output_final_state=True,
        impl=impl,
    )  # fmt: skip
    outs = [o, *final.anchor, *final.grad_sum, *final.weights]
    grads = random_projection_grads(outs, x) if grad else {}
    return outs, final.offset, grads


def compare(leaves, meta, *, causal, dtype, grad=True, n_sum=None):
    """Triton vs the chunked form in float64 within the R13 budget (``n_sum``: terms per gradient, by key)."""
    outs64, off64, g64 = run(leaves, meta, impl="chunk", dtype=torch.float64, causal=causal, grad=grad)
    outs_lo, _, g_lo = run(leaves, meta, impl="chunk", dtype=dtype, causal=causal, grad=grad)
    outs, off, g = run(leaves, meta, impl="triton", dtype=dtype, causal=causal, grad=grad)
    assert off == off64
    assert outs[0].dtype == dtype
    names = ["o", "W", "b", "gW", "gb", "weights_W", "weights_b"]
    with BudgetChecks() as check:  # a failure names every quantity over its budget
        for name, a, r, lo in zip(names, outs, outs64, outs_lo):
            check(name, a, r, lo, dtype)
        for key in g:
            check(f"grad {key}", g[key], g64[key], g_lo[key], dtype, (n_sum or {}).get(key, 1))


# T = 40 = 2 full mini-batches + 8; offset 5 resumes inside a mini-batch; T = 9 < b with offset 3 (one
# partial segment); T = 13 with offset 3 completes exactly one mini-batch; T = 32 two full ones.
CASES = [(40, 0), (40, 5), (9, 3), (13, 3), (32, 0)]


@pytest.mark.parametrize("D", [16, 32])
@pytest.mark.parametrize("T,offset", CASES, ids=[f"T{t}-off{o}" for t, o in CASES])
def test_chunk_causal_fp32(T, offset, D):
    leaves, meta = make_case(1, 2, T, D, offset=offset, seed=T + offset + D)
    compare(leaves, meta, causal=True, dtype=torch.float32)


@pytest.mark.parametrize("T", [40, 32], ids=lambda t: f"T{t}")
def test_chunk_noncausal_fp32(T):
    leaves, meta = make_case(2, 1, T, 16, seed=T)
    compare(leaves, meta, causal=False, dtype=torch.float32)


def test_chunk_odd_head_dim_fp32():
    # D = 24 pads to a 32-wide block; b = 8 pads to 16 rows
    leaves, meta = make_case(1, 1, 21, 24, b=8, offset=2, seed=3)
    compare(leaves, meta, causal=True, dtype=torch.float32)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_chunk_fwd_fp16(causal):
    leaves, meta = make_case(1, 2, 40, 32, seed=7)
    compare(leaves, meta, causal=causal, dtype=torch.float16, grad=False)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("T,offset", [(53, 0), (40, 5)], ids=["T53", "T40-off5"])
def test_chunk_input_dtype_dots_fp16(T, offset, causal, monkeypatch):
    """TTT_TRITON_DOTS=input: fp16 dot operands and an fp16 anchor checkpoint (the bf16 default's
    machinery; the interpreter cannot run bf16). Every dot rounds its operands, so a gradient summed over
    all n tokens (token_eta, LN parameters) carries ~sqrt(n) roundings: its budget counts them (n_sum),
    as the TTT-MLP tests do."""
    if not causal and offset:
        pytest.skip("non-causal calls start at a mini-batch boundary")
    monkeypatch.setenv("TTT_TRITON_DOTS", "input")
    B, H = 2, 2
    leaves, meta = make_case(B, H, T, 16, offset=offset, seed=T + 5)
    # token_eta[b-1] of a non-causal call sums every token of every head; an LN parameter every token of B
    n_sum = {"token_eta": B * H * T, "ln_weight": B * T, "ln_bias": B * T}
    compare(leaves, meta, causal=causal, dtype=torch.float16, n_sum=n_sum)


def test_backward_follows_the_forwards_dot_mode(monkeypatch):
    """TTT_TRITON_DOTS changed between forward and backward: the backward rounds as the forward did (it
    reads the mode off the checkpoints), so the gradients equal those of a run in one mode."""
    leaves, meta = make_case(1, 2, 40, 16, offset=5, seed=4)

    def grads(mode_bwd):
        monkeypatch.setenv("TTT_TRITON_DOTS", "input")
        x = {key: val.to(torch.float16 if key in ("q", "k", "v") else torch.float32).requires_grad_()
             for key, val in leaves.items()}  # fmt: skip
        state = TTTState((x["W"], x["b"]), (x["W"], x["b"]), (x["gW"], x["gb"]), 5, 16, "ttt_linear")
        o = ttt_linear(x["q"], x["k"], x["v"], x["lr"], x["ln_weight"], x["ln_bias"], initial_state=state,
                       token_eta=x["token_eta"], impl="triton").output  # fmt: skip
        monkeypatch.setenv("TTT_TRITON_DOTS", mode_bwd)
        o.float().pow(2).sum().backward()
        return [x[key].grad for key in ("q", "k", "v", "lr", "W", "ln_weight", "token_eta")]

    for same, switched in zip(grads("input"), grads("tf32")):
        torch.testing.assert_close(switched, same, rtol=0, atol=0)


def test_dot_precision_modes(monkeypatch):
    from ttt.ops.triton_shared import checkpoint_dtype, dot_precision

    monkeypatch.delenv("TTT_TRITON_DOTS", raising=False)
    assert [dot_precision(d) for d in (torch.float32, torch.bfloat16, torch.float16)] == [
        "ieee",
        "bf16",
        "tf32",
    ]
    assert dot_precision(torch.float16, "input") == "fp16"
    assert dot_precision(torch.bfloat16, "tf32") == "tf32"
    monkeypatch.setenv("TTT_TRITON_DOTS", "tf32")
    assert dot_precision(torch.bfloat16) == "tf32"
    assert dot_precision(torch.float32) == "ieee"
    monkeypatch.setenv("TTT_TRITON_DOTS", "fast")
    with pytest.raises(ValueError, match="TTT_TRITON_DOTS must be one of"):
        dot_precision(torch.bfloat16)
    assert [checkpoint_dtype(p) for p in ("bf16", "fp16", "tf32", "ieee")] == [
        torch.bfloat16,
        torch.float16,
        torch.float32,
        torch.float32,
    ]


def test_split_equals_full():
    """Two triton calls chained through the returned state == one call (split inside a mini-batch)."""
    leaves, meta = make_case(1, 2, 40, 16, seed=11)
    full, _, _ = run(leaves, meta, impl="triton", dtype=torch.float32, causal=True, grad=False)
    x = {k: v.float() for k, v in leaves.items()}
    state = (x["W"], x["b"])
    parts = []
    for sl in (slice(0, 19), slice(19, 40)):
        o, state = ttt_linear(
            x["q"][:, :, sl], x["k"][:, :, sl], x["v"][:, :, sl], x["lr"][:, :, sl], x["ln_weight"],
            x["ln_bias"], initial_state=state, token_eta=x["token_eta"], output_final_state=True,
            impl="triton",
        )  # fmt: skip
        parts.append(o)
    torch.testing.assert_close(torch.cat(parts, 2), full[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state.anchor[0], full[1], rtol=1e-5, atol=1e-5)


def test_decode_steps_equal_full():
    """20 single-token triton calls (the chunk kernels at T = 1) chained through the state == one call."""
    leaves, meta = make_case(1, 2, 20, 16, seed=13)
    full, _, _ = run(leaves, meta, impl="triton", dtype=torch.float32, causal=True, grad=False)
    x = {k: v.float() for k, v in leaves.items()}
    state, outs = (x["W"], x["b"]), []
    for t in range(20):
        sl = slice(t, t + 1)
        o, state = ttt_linear(
            x["q"][:, :, sl], x["k"][:, :, sl], x["v"][:, :, sl], x["lr"][:, :, sl], x["ln_weight"],
            x["ln_bias"], initial_state=state, token_eta=x["token_eta"], output_final_state=True,
            impl="triton",
        )  # fmt: skip
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs, 2), full[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state.grad_sum[0], full[3], rtol=1e-5, atol=1e-5)


def _varlen_run(leaves, lens, offset, *, packed, dtype, causal):
    """Packed triton call (``packed``) or one chunked call per sequence; returns outputs and grads."""
    sd = torch.float64 if dtype == torch.float64 else torch.float32
    x = {}
    for key, val in leaves.items():
        wants_grad = not (key in ("gW", "gb") and offset == 0)
        x[key] = val.to(dtype if key in ("q", "k", "v") else sd).detach().requires_grad_(wants_grad)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], device=DEVICE)
    te = x["token_eta"]
    if packed:
        from ttt.ops.ttt_linear.triton import triton_ttt_linear

        anchor, gsum = (x["W"], x["b"]), (x["gW"], x["gb"])
        state = TTTState(anchor, anchor, gsum, offset, te.shape[0], "ttt_linear")
        inputs = TTTInputs(x["q"], x["k"], x["v"], x["lr"], x["ln_weight"], x["ln_bias"], te)
        o, final = triton_ttt_linear(inputs, state, causal=causal, eps=1e-6, cu_seqlens=cu)
        outs = [o, *final.anchor, *final.grad_sum]
    else:
        parts, finals = [], []
        for n in range(len(lens)):
            sl, row = slice(cu[n], cu[n + 1]), slice(n, n + 1)
            anchor, gsum = (x["W"][row], x["b"][row]), (x["gW"][row], x["gb"][row])
            state = TTTState(anchor, anchor, gsum, offset, te.shape[0], "ttt_linear")
            o, final = ttt_linear(
                x["q"][:, :, sl], x["k"][:, :, sl], x["v"][:, :, sl], x["lr"][:, :, sl], x["ln_weight"],
                x["ln_bias"], initial_state=state, token_eta=te, mini_batch_size=te.shape[0], causal=causal,
                output_final_state=True, impl="chunk",
            )  # fmt: skip
            parts.append(o)
            finals.append(final)
        outs = [torch.cat(parts, 2)] + [torch.cat([getattr(f, a)[i] for f in finals]) for a in ("anchor", "grad_sum")
                                         for i in range(2)]  # fmt: skip
    return outs, random_projection_grads(outs, x)


# lengths chosen so that sequences end at the same position of a mini-batch (a TTTState has one offset)
# and cover one segment, several, partial and full last mini-batches
VARLEN = [((20, 4, 36), 0, True), ((9, 25, 41), 7, True), ((32, 16), 0, False)]


@pytest.mark.parametrize("lens,offset,causal", VARLEN, ids=["causal-off0", "causal-off7", "noncausal"])
def test_varlen_equals_per_sequence(lens, offset, causal):
    """Packed sequences (cu_seqlens) == one chunked call per sequence: outputs, states, all gradients."""
    N, H, D = len(lens), 2, 16
    leaves, _ = make_case(N, H, sum(lens), D, offset=offset, seed=sum(lens) + offset)
    for key in ("q", "k", "v", "lr"):
        leaves[key] = leaves[key][:1]  # packed along T: [1, H, sum T_n, ...]
    ref, g_ref = _varlen_run(leaves, lens, offset, packed=False, dtype=torch.float64, causal=causal)
    low, g_low = _varlen_run(leaves, lens, offset, packed=False, dtype=torch.float32, causal=causal)
    got, g_got = _varlen_run(leaves, lens, offset, packed=True, dtype=torch.float32, causal=causal)
    with BudgetChecks() as check:
        for name, a, r, lo in zip(["o", "W", "b", "gW", "gb"], got, ref, low):
            check(name, a, r, lo, torch.float32)
        for key in g_ref:
            check(f"grad {key}", g_got[key], g_ref[key], g_low[key], torch.float32)


def test_triton_form_runs(monkeypatch):
    """impl='triton' really reaches the fused kernel (R4): count calls of the forward launcher."""
    fn = importlib.import_module("ttt.ops.ttt_linear.triton.function")
    calls = []
    orig = fn.chunk_ttt_linear_fwd_fused
    monkeypatch.setattr(fn, "chunk_ttt_linear_fwd_fused", lambda *a, **kw: calls.append(1) or orig(*a, **kw))
    leaves, meta = make_case(1, 1, 16, 16, seed=5)
    run(leaves, meta, impl="triton", dtype=torch.float32, causal=True, grad=False)
    assert calls == [1]


# ---------------------------------------------------------------- GPU (bf16, larger shapes, NaN poisoning)


GPU_CASES = [
    (2, 4, 300, 64, 0, True),
    (2, 4, 301, 64, 7, True),
    (1, 2, 160, 128, 0, False),
    (1, 4, 1000, 128, 9, True),
]


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("B,H,T,D,offset,causal", GPU_CASES, ids=lambda x: str(x))
def test_gpu_chunk(B, H, T, D, offset, causal, dtype, nan_poison):
    leaves, meta = make_case(B, H, T, D, offset=offset, seed=T + D)
    compare(leaves, meta, causal=causal, dtype=dtype)
