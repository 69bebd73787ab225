"""Stage by stage (STYLE R11): each launcher of the Triton TTT-Linear against its own small float64 torch
reference, so a failure names the stage. The end-to-end tests are in ``test_triton.py``.

- ``chunk_ttt_linear_fwd_fused`` with checkpoints: the anchor at the start of every mini-batch segment
  == the state the float64 chunked form reaches there.
- ``chunk_ttt_linear_bwd_local``: every gradient of the output path of each segment, with the anchor
  and the inner gradient G held fixed == autograd through a torch transcription of that path.
- the sequential stage of ``chunk_ttt_linear_bwd``: given the parallel stage's dZbar and dG_local, what it
  adds == autograd through a float64 transcription of the anchor recurrence alone.

Without CUDA the kernels run under ``TRITON_INTERPRET=1`` (set by tests/conftest.py).
"""

from __future__ import annotations

import importlib

import pytest
import torch

pytest.importorskip("triton")

from ttt.ops import TTTState, ttt_linear  # noqa: E402
from ttt.ops.common import split_segments  # noqa: E402
from ttt.ops.ttt_linear.triton.reference import chunk_ttt_linear_bwd_local_ref, chunk_ttt_linear_bwd_seq_ref  # noqa: E402
from ttt.testing import assert_stage_matches, stage_case  # noqa: E402

fwd = importlib.import_module("ttt.ops.ttt_linear.triton.chunk_fwd")
bwd = importlib.import_module("ttt.ops.ttt_linear.triton.chunk_bwd")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-6
# T, offset, mini-batch, causal: ends on a mini-batch boundary; ends partial; resumes mid-batch and ends
# partial; one partial segment only
CASES = [(29, 3, 8, True), (29, 0, 8, False), (16, 5, 16, True), (7, 3, 16, True)]


def make(B, H, T, D, b, offset, seed=0):
    """Float64 inputs and a resumable state (anchor and, at offset > 0, a carried gradient sum)."""
    x, r = stage_case(B, H, T, D, b, seed, DEVICE)
    x.update(W=r(B, H, D, D, scale=0.4 / D**0.5), bias=r(B, H, D, scale=0.1))
    on = float(offset > 0)
    x["S"] = (r(B, H, D, D, scale=0.1 / D**0.5) * on, r(B, H, D, scale=0.1) * on)
    return x


def launch_forward(x, offset, causal):
    f32 = {key: (val.float().contiguous() if torch.is_tensor(val) else val) for key, val in x.items()}
    _, _, _, ckpt = fwd.chunk_ttt_linear_fwd_fused(
        f32["q"], f32["k"], f32["v"], f32["lr"], f32["te"], f32["ln_w"], f32["ln_b"], (f32["W"], f32["bias"]),
        tuple(s.float().contiguous() for s in x["S"]), offset=offset, causal=causal, eps=EPS, store_ckpt=True,
    )  # fmt: skip
    return f32, ckpt


@pytest.mark.parametrize("T,offset,b,causal", CASES, ids=lambda v: str(v))
def test_forward_checkpoints_are_the_segment_anchors(T, offset, b, causal):
    x = make(2, 2, T, 16, b, offset, seed=T)
    _, (ckpt_w, ckpt_b) = launch_forward(x, offset, causal)
    state = TTTState((x["W"], x["bias"]), (x["W"], x["bias"]), x["S"], offset, b, "ttt_linear")
    for n, (start, c) in enumerate(split_segments(T, offset, b)):
        torch.testing.assert_close(ckpt_w[:, :, n].double(), state.anchor[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ckpt_b[:, :, n].double(), state.anchor[1], rtol=1e-5, atol=1e-6)
        sl = slice(start, start + c)
        _, state = ttt_linear(x["q"][:, :, sl], x["k"][:, :, sl], x["v"][:, :, sl], x["lr"][:, :, sl], x["ln_w"],
                              x["ln_b"], initial_state=state, token_eta=x["te"], mini_batch_size=b,
                              causal=causal, output_final_state=True, impl="chunk")  # fmt: skip


@pytest.mark.parametrize("T,offset,b,causal", CASES, ids=lambda v: str(v))
def test_backward_local_stage_is_the_output_path(T, offset, b, causal):
    x = make(2, 2, T, 16, b, offset, seed=T + 1)
    f32, ckpt = launch_forward(x, offset, causal)
    loc = bwd.chunk_ttt_linear_bwd_local(
        f32["q"], f32["k"], f32["v"], f32["lr"], f32["te"], f32["ln_w"], f32["ln_b"], ckpt,
        tuple(s.float().contiguous() for s in x["S"]), f32["do"], offset=offset, causal=causal, eps=EPS,
    )  # fmt: skip
    ref = chunk_ttt_linear_bwd_local_ref(x, ckpt, offset, b, causal)
    got = dict(dq=loc.dq, dk=loc.dk, dlr=loc.dlr, dzb=loc.dzb, dgl=loc.dgl, dte=loc.dte.sum((0, 1, 2)),
               dln_w=loc.dln_w.sum((0, 2)), dln_b=loc.dln_b.sum((0, 2)))  # fmt: skip
    if offset:  # the carried gradient sum is an input of segment 0 only when the call resumes mid-batch
        got.update(dgW0=loc.dg0[0], dgb0=loc.dg0[1])
    assert_stage_matches(got, ref)


@pytest.mark.parametrize("T,offset,b,causal", CASES, ids=lambda v: str(v))
def test_backward_sequential_stage_is_the_recurrence(T, offset, b, causal):
    """The whole backward minus the parallel stage's partials == the recurrence's own gradients, fed
    with the parallel stage's dZbar and dG_local (both launched on the same checkpoints)."""
    x = make(2, 2, T, 16, b, offset, seed=T + 2)
    f32, ckpt = launch_forward(x, offset, causal)
    g = torch.Generator().manual_seed(T)
    dht = tuple(
        torch.randn(t.shape, generator=g, dtype=torch.float64).to(DEVICE) * 0.3 for t in (x["W"], x["bias"])
    )
    dgt = tuple(torch.randn(t.shape, generator=g, dtype=torch.float64).to(DEVICE) * 0.3 for t in x["S"])
    args = (f32["q"], f32["k"], f32["v"], f32["lr"], f32["te"], f32["ln_w"], f32["ln_b"], ckpt,
            tuple(s.float().contiguous() for s in x["S"]), f32["do"])  # fmt: skip
    meta = dict(offset=offset, causal=causal, eps=EPS)
    loc = bwd.chunk_ttt_linear_bwd_local(*args, **meta)
    dq, dk, dv, dlr, dte, dln_w, dln_b, dh0, dg0 = bwd.chunk_ttt_linear_bwd(
        *args, tuple(t.float() for t in dht), tuple(t.float() for t in dgt), **meta
    )
    ref = chunk_ttt_linear_bwd_seq_ref(x, loc.dzb.double(), loc.dgl.double(), dht, dgt, offset, b)
    got = dict(dk=dk.double() - loc.dk, dv=dv, dlr=dlr - loc.dlr, dte=dte - loc.dte.sum((0, 1, 2)),
               dln_w=dln_w - loc.dln_w.sum((0, 2)), dln_b=dln_b - loc.dln_b.sum((0, 2)), dW0=dh0[0], db0=dh0[1])  # fmt: skip
    # the sweep's part of the carried gradient sum's gradient (compared at offset 0 too: the kernel and
    # the reference both treat the zero sum as an input there)
    got.update(dgW0=dg0[0] - loc.dg0[0], dgb0=dg0[1] - loc.dg0[1])
    assert_stage_matches(got, ref)
