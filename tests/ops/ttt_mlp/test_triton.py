"""Triton TTT-MLP (``impl="triton"``: fused forward kernel, two-kernel Triton backward) vs the chunked dual
form in float64: output, final state and every gradient.

Without CUDA the kernel runs under ``TRITON_INTERPRET=1`` at tiny shapes (fp32 / fp16). Tests marked ``gpu``
take bf16 and larger shapes and poison fresh buffers with NaN.
"""

from __future__ import annotations

import importlib

import pytest
import torch

# without CUDA the kernels run under Triton's interpreter: tests/conftest.py sets TRITON_INTERPRET=1
# before any module imports Triton (Triton decides when a kernel module is first imported)
pytest.importorskip("triton")

from ttt.ops import TTTState, ttt_mlp  # noqa: E402
from ttt.ops.common import default_token_eta  # noqa: E402
from ttt.testing import BudgetChecks, random_projection_grads  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    """impl="triton" on CPU tensors is refused unless TRITON_INTERPRET=1."""
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")


STATE = ("W1", "b1", "W2", "b2")
SUMS = ("S1", "s1", "S2", "s2")


def make_case(B, H, T, D, M, *, b=16, offset=0, seed=0, device=DEVICE):
    """Float64 leaves for one call that resumes ``offset`` tokens into a mini-batch."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, scale=1.0: torch.randn(*s, generator=g, dtype=torch.float64) * scale  # noqa: E731
    on = float(offset > 0)
    leaves = {
        "q": r(B, H, T, D, scale=0.7), "k": r(B, H, T, D, scale=0.7), "v": r(B, H, T, D),
        "lr": torch.rand(B, H, T, generator=g, dtype=torch.float64) * 0.5,
        "ln_weight": 1 + r(H, D, scale=0.2), "ln_bias": r(H, D, scale=0.2),
        "token_eta": default_token_eta(b).double() * (1 + 0.1 * r(b).abs()),
        "W1": r(B, H, D, M, scale=0.4 / D**0.5), "b1": r(B, H, M, scale=0.1),
        "W2": r(B, H, M, D, scale=0.4 / M**0.5), "b2": r(B, H, D, scale=0.1),
        "S1": r(B, H, D, M, scale=0.1 / D**0.5) * on, "s1": r(B, H, M, scale=0.1) * on,
        "S2": r(B, H, M, D, scale=0.1 / M**0.5) * on, "s2": r(B, H, D, scale=0.1) * on,
    }  # fmt: skip
    return {key: val.to(device) for key, val in leaves.items()}, dict(b=b, offset=offset)


def run(leaves, meta, *, impl, dtype, causal, grad=True):
    sd = torch.float64 if dtype == torch.float64 else torch.float32
    x = {}
    for key, val in leaves.items():
        # at offset 0 the gradient sums of a valid state are zero and not inputs of the math
        wants_grad = grad and not (key in SUMS and meta["offset"] == 0)
        x[key] = val.to(dtype if key in ("q", "k", "v") else sd).detach().requires_grad_(wants_grad)
    anchor, sums = tuple(x[n] for n in STATE), tuple(x[n] for n in SUMS)
    state = TTTState(anchor, anchor, sums, meta["offset"], meta["b"], "ttt_mlp")
    o, final = ttt_mlp(
        x["q"], x["k"], x["v"], x["lr"], x["ln_weight"], x["ln_bias"], initial_state=state,
        token_eta=x["token_eta"], mini_batch_size=meta["b"], causal=causal, output_final_state=True,
        impl=impl,
    )  # fmt: skip
    outs = [o, *final.anchor, *final.grad_sum, *final.weights]
    grads = random_projection_grads(outs, x) if grad else {}
    return outs, final.offset, grads


def terms(key, n_tok, leaves):
    """How many products a gradient entry sums (the budget's n_sum): every token for the shared parameters,
    the D + M entries of one token for its learning rate, one otherwise."""
    if key in ("token_eta", "ln_weight", "ln_bias"):
        return n_tok
    return leaves["q"].shape[-1] + leaves["b1"].shape[-1] if key == "lr" else 1


def compare(leaves, meta, *, causal, dtype, grad=True):
    outs64, off64, g64 = run(leaves, meta, impl="chunk", dtype=torch.float64, causal=causal, grad=grad)
    outs_lo, _, g_lo = run(leaves, meta, impl="chunk", dtype=dtype, causal=causal, grad=grad)
    outs, off, g = run(leaves, meta, impl="triton", dtype=dtype, causal=causal, grad=grad)
    assert off == off64
    assert outs[0].dtype == dtype
    names = ["o", *STATE, *SUMS, *(f"weights_{n}" for n in STATE)]
    n_tok = leaves["lr"].numel()
    with BudgetChecks() as check:  # a failure names every quantity over its budget
        for name, a, r, lo in zip(names, outs, outs64, outs_lo):
            check(name, a, r, lo, dtype)
        for key in g:
            check(f"grad {key}", g[key], g64[key], g_lo[key], dtype, terms(key, n_tok, leaves))


CASES = [(40, 0), (40, 5), (9, 3), (13, 3)]


@pytest.mark.parametrize("T,offset", CASES, ids=[f"T{t}-off{o}" for t, o in CASES])
def test_chunk_causal_fp32(T, offset):
    leaves, meta = make_case(1, 2, T, 16, 64, offset=offset, seed=T + offset)
    compare(leaves, meta, causal=True, dtype=torch.float32)


def test_chunk_noncausal_fp32():
    leaves, meta = make_case(2, 1, 40, 16, 64, seed=2)
    compare(leaves, meta, causal=False, dtype=torch.float32)


def test_chunk_odd_dims_fp32():
    # D = 24, M = 40 pad to 32 / 64; b = 8 pads to 16 rows
    leaves, meta = make_case(1, 1, 21, 24, 40, b=8, offset=2, seed=3)
    compare(leaves, meta, causal=True, dtype=torch.float32)


def test_chunk_fp16():
    # fp16 inputs take the tf32 dot path and cast dq, dk, dv back to fp16
    leaves, meta = make_case(1, 2, 40, 16, 64, offset=5, seed=7)
    compare(leaves, meta, causal=True, dtype=torch.float16)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_chunk_input_dtype_dots_fp16(monkeypatch, causal):
    """TTT_TRITON_DOTS=input: fp16 dot operands (the bf16 default's machinery; the interpreter cannot run
    bf16), forward, state and every gradient within the same budget."""
    monkeypatch.setenv("TTT_TRITON_DOTS", "input")
    leaves, meta = make_case(1, 2, 40, 16, 64, offset=5 if causal else 0, seed=8)
    compare(leaves, meta, causal=causal, dtype=torch.float16)


def test_backward_follows_the_forwards_dot_mode(monkeypatch):
    """TTT_TRITON_DOTS changed between forward and backward: the backward rounds as the forward did (it
    reads the mode off the checkpoints), so the gradients equal those of a run in one mode."""
    leaves, meta = make_case(1, 2, 24, 16, 32, offset=5, seed=4)

    def grads(mode_bwd):
        monkeypatch.setenv("TTT_TRITON_DOTS", "input")
        x = {key: val.to(torch.float16 if key in ("q", "k", "v") else torch.float32).requires_grad_()
             for key, val in leaves.items()}  # fmt: skip
        anchor = tuple(x[n] for n in STATE)
        state = TTTState(anchor, anchor, tuple(x[n] for n in SUMS), 5, 16, "ttt_mlp")
        o = ttt_mlp(x["q"], x["k"], x["v"], x["lr"], x["ln_weight"], x["ln_bias"], initial_state=state,
                    token_eta=x["token_eta"], impl="triton").output  # fmt: skip
        monkeypatch.setenv("TTT_TRITON_DOTS", mode_bwd)
        o.float().pow(2).sum().backward()
        return [x[key].grad for key in ("q", "k", "v", "lr", "W1", "W2", "ln_weight")]

    for same, switched in zip(grads("input"), grads("tf32")):
        torch.testing.assert_close(switched, same, rtol=0, atol=0)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_chunk_m_tiles_fp32(monkeypatch, causal):
    """The backward kernels walk M = 40 in 16-column tiles, the last one partly masked."""
    monkeypatch.setattr(importlib.import_module("ttt.ops.ttt_mlp.triton.chunk_bwd"), "MAX_BLOCK_M", 16)
    # non-causal calls cannot resume inside a mini-batch
    leaves, meta = make_case(1, 1, 21, 24, 40, b=8, offset=3 if causal else 0, seed=11)
    compare(leaves, meta, causal=causal, dtype=torch.float32)


def test_triton_form_runs(monkeypatch):
    """impl='triton' really reaches the fused forward and the Triton backward (R4): count launcher calls."""
    fn = importlib.import_module("ttt.ops.ttt_mlp.triton.function")
    calls = []
    for name in ("chunk_ttt_mlp_fwd_fused", "chunk_ttt_mlp_bwd"):
        orig = getattr(fn, name)
        counted = lambda *a, _f=orig, _n=name, **kw: calls.append(_n) or _f(*a, **kw)  # noqa: E731
        monkeypatch.setattr(fn, name, counted)
    leaves, meta = make_case(1, 1, 16, 16, 64, seed=5)
    run(leaves, meta, impl="triton", dtype=torch.float32, causal=True)
    assert calls == ["chunk_ttt_mlp_fwd_fused", "chunk_ttt_mlp_bwd"]


def _varlen_run(leaves, lens, offset, *, packed, dtype, causal):
    """One ``ttt_mlp(impl="triton", cu_seqlens=...)`` call (``packed``) or one chunked call per sequence.

    Returns the outputs (o, then the final anchor and gradient sums when the sequences end at one position
    of a mini-batch) and the gradients of every leaf that takes one.
    """
    sd = torch.float64 if dtype == torch.float64 else torch.float32
    x = {}
    for key, val in leaves.items():
        wants_grad = not (key in SUMS and offset == 0)
        x[key] = val.to(dtype if key in ("q", "k", "v") else sd).detach().requires_grad_(wants_grad)
    b = x["token_eta"].shape[0]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], device=x["q"].device)
    same_end = len({(offset + n) % b for n in lens}) == 1
    common = dict(token_eta=x["token_eta"], mini_batch_size=b, causal=causal, output_final_state=same_end)
    tok = lambda sl: (x[key][:, :, sl] for key in ("q", "k", "v", "lr"))  # noqa: E731
    if packed:
        state = TTTState(
            *[tuple(x[n] for n in names) for names in (STATE, STATE, SUMS)], offset, b, "ttt_mlp"
        )
        o, final = ttt_mlp(*tok(slice(None)), x["ln_weight"], x["ln_bias"], initial_state=state, impl="triton",
                           cu_seqlens=cu, **common)  # fmt: skip
        finals = [final] if same_end else []
    else:
        parts, finals = [], []
        for n in range(len(lens)):
            rows = [tuple(x[key][n : n + 1] for key in names) for names in (STATE, STATE, SUMS)]
            o, final = ttt_mlp(
                *tok(slice(cu[n], cu[n + 1])), x["ln_weight"], x["ln_bias"],
                initial_state=TTTState(*rows, offset, b, "ttt_mlp"), impl="chunk", **common,
            )  # fmt: skip
            parts.append(o)
            finals.append(final)
        o = torch.cat(parts, 2)
        finals = [TTTState.cat(finals)] if same_end else []
    outs = [o] + [t for f in finals for t in (*f.anchor, *f.grad_sum)]
    return outs, random_projection_grads(outs, x)


def compare_varlen(lens, offset, *, causal, D, M, dtype, b=8, H=2):
    """Packed triton call == one chunked float64 call per sequence: outputs, states, all gradients."""
    leaves, _ = make_case(len(lens), H, sum(lens), D, M, b=b, offset=offset, seed=sum(lens) + offset + M)
    for key in ("q", "k", "v", "lr"):
        leaves[key] = leaves[key][:1]  # packed along T: [1, H, sum T_n, ...]
    kw = dict(causal=causal)
    ref, g_ref = _varlen_run(leaves, lens, offset, packed=False, dtype=torch.float64, **kw)
    low, g_low = _varlen_run(leaves, lens, offset, packed=False, dtype=dtype, **kw)
    got, g_got = _varlen_run(leaves, lens, offset, packed=True, dtype=dtype, **kw)
    assert len(got) == len(ref)
    assert g_got.keys() == g_ref.keys()
    n_tok = leaves["lr"].numel()
    with BudgetChecks() as check:
        for name, a, r, lo in zip(["o", *STATE, *SUMS], got, ref, low):
            check(name, a, r, lo, dtype)
        for key in g_ref:
            check(f"grad {key}", g_got[key], g_ref[key], g_low[key], dtype, terms(key, n_tok, leaves))


# mini-batch 8: (5, 16, 23) end at different positions of a mini-batch (no final state) and cover one
# segment, full and partial last mini-batches; (16, 32) end at one position (final state compared);
# M = 80 walks the backward in three 32-column tiles, the last one half masked
VARLEN = [
    ((5, 16, 23), 0, True, 64),
    ((5, 16, 23), 3, True, 64),
    ((16, 32), 3, True, 64),
    ((16, 32), 0, False, 64),
    ((5, 16, 23), 0, False, 80),
]


@pytest.mark.parametrize(
    "lens,offset,causal,M", VARLEN, ids=lambda x: "-".join(map(str, x)) if isinstance(x, tuple) else str(x)
)
def test_varlen_equals_per_sequence(lens, offset, causal, M, nan_poison):
    # NaN poisoning: segments past a short sequence's end must not read unwritten checkpoints
    compare_varlen(list(lens), offset, causal=causal, D=16, M=M, dtype=torch.float32)


def test_varlen_one_launch(monkeypatch):
    """Packed sequences run one forward launch and one backward launcher call, not one per sequence."""
    fn = importlib.import_module("ttt.ops.ttt_mlp.triton.function")
    calls = []
    for name in ("chunk_ttt_mlp_fwd_fused", "chunk_ttt_mlp_bwd"):
        orig = getattr(fn, name)
        counted = lambda *a, _f=orig, _n=name, **kw: calls.append(_n) or _f(*a, **kw)  # noqa: E731
        monkeypatch.setattr(fn, name, counted)
    leaves, _ = make_case(3, 1, 24, 16, 64, b=8, seed=9)
    for key in ("q", "k", "v", "lr"):
        leaves[key] = leaves[key][:1]
    _varlen_run(leaves, [1, 9, 14], 0, packed=True, dtype=torch.float32, causal=True)
    assert calls == ["chunk_ttt_mlp_fwd_fused", "chunk_ttt_mlp_bwd"]


TILED = [(40, 0, True, 16, 64), (13, 3, True, 24, 40), (32, 0, False, 16, 48)]


@pytest.mark.parametrize("T,offset,causal,D,M", TILED, ids=lambda x: str(x))
def test_chunk_tiled_forward_fp32(monkeypatch, T, offset, causal, D, M):
    """The tiled forward (anchor stepped in memory, 16-column tiles of M): what hidden sizes too large for
    the fused forward take; forced here at small sizes. Outputs, state and all gradients."""
    fwd = importlib.import_module("ttt.ops.ttt_mlp.triton.chunk_fwd")
    monkeypatch.setattr(fwd, "FUSED_MAX_TILE", 0)
    monkeypatch.setattr(fwd, "TILED_BLOCK_M", 16)
    leaves, meta = make_case(1, 2, T, D, M, b=8, offset=offset, seed=T + D)
    compare(leaves, meta, causal=causal, dtype=torch.float32)


def test_fused_forward_out_of_resources_names_the_tiled_forward(monkeypatch):
    """A GPU with less shared memory than the fused forward needs gets an error naming the switch, not a
    silent change of kernel; with TTT_MLP_FORWARD=tiled the tiled forward gives the same results."""
    import triton

    fwd = importlib.import_module("ttt.ops.ttt_mlp.triton.chunk_fwd")

    class NoRoom:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise triton.runtime.errors.OutOfResources(300_000, 232_448, "shared memory")

            return launch

    monkeypatch.setattr(fwd, "chunk_ttt_mlp_fwd_kernel_fused", NoRoom())
    monkeypatch.setattr(fwd, "TILED_BLOCK_M", 16)
    leaves, meta = make_case(1, 2, 21, 16, 40, b=8, offset=3, seed=4)
    with pytest.raises(RuntimeError, match="does not fit this GPU .*TTT_MLP_FORWARD=tiled"):
        compare(leaves, meta, causal=True, dtype=torch.float32)
    monkeypatch.setenv("TTT_MLP_FORWARD", "tiled")
    compare(leaves, meta, causal=True, dtype=torch.float32)
    monkeypatch.setenv("TTT_MLP_FORWARD", "fast")
    with pytest.raises(ValueError, match="TTT_MLP_FORWARD must be one of"):
        compare(leaves, meta, causal=True, dtype=torch.float32)


def test_varlen_tiled_forward_fp32(monkeypatch):
    """Packed sequences through the tiled forward."""
    fwd = importlib.import_module("ttt.ops.ttt_mlp.triton.chunk_fwd")
    monkeypatch.setattr(fwd, "FUSED_MAX_TILE", 0)
    monkeypatch.setattr(fwd, "TILED_BLOCK_M", 16)
    compare_varlen([5, 16, 23], 3, causal=True, D=16, M=40, dtype=torch.float32, b=8, H=1)


# D = 48 pads to 64; M = 176 pads to 256 in the forward and ends in a half-masked M tile of the backward;
# D = 128, M = 512 runs the tiled forward
GPU_CASES = [
    (2, 4, 300, 64, 256, 0, True),
    (1, 2, 301, 64, 256, 7, True),
    (1, 2, 160, 32, 128, 0, False),
    (1, 2, 200, 48, 176, 3, True),
    (1, 2, 170, 128, 512, 5, True),  # the tiled forward (too large for the fused one)
]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("B,H,T,D,M,offset,causal", GPU_CASES, ids=lambda x: str(x))
def test_gpu_chunk(B, H, T, D, M, offset, causal, dtype, nan_poison):
    leaves, meta = make_case(B, H, T, D, M, offset=offset, seed=T + D)
    compare(leaves, meta, causal=causal, dtype=dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_gpu_varlen(causal, nan_poison):
    compare_varlen([300, 77, 512], 0, causal=causal, D=64, M=256, dtype=torch.bfloat16, b=16, H=4)
