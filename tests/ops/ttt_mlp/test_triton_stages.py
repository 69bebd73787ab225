"""Stage by stage (STYLE R11): the two backward stages of the Triton TTT-MLP, each against its own float64
torch transcription. The end-to-end tests are in ``test_triton.py``.

With the anchor (the forward's checkpoint) and the inner quantities G1, G2 and X2 held fixed, a segment's
output is (E[i, j] = eta_i lr_j for j <= i, or te[last] lr_j on every column when non-causal)

    Z1b = Q W1 + b1 - eta (Q S1 + s1) - (E * (Q K^T + 1)) G1,   X2b = gelu(Z1b)
    Z2b = X2b W2 + b2 - eta (X2b S2 + s2) - (E * (X2b X2^T + 1)) G2,   o = Q + LN(Z2b)

and ``chunk_ttt_mlp_bwd_local`` must return the gradients of sum(o * do) w.r.t. Q (complete), K and lr
(their output-path parts), Z1b, Z2b, G1, G2, X2, token_eta, the LN parameters and the carried sums, and
X2b itself. The sequential stage, fed with those, must add the gradients of the anchor recurrence alone
(``chunk_ttt_mlp_bwd_seq_ref``). Without CUDA the kernels run under ``TRITON_INTERPRET=1`` (tests/conftest.py).
"""

from __future__ import annotations

import importlib

import pytest
import torch

pytest.importorskip("triton")

from ttt.ops.ttt_mlp.triton.reference import chunk_ttt_mlp_bwd_local_ref, chunk_ttt_mlp_bwd_seq_ref  # noqa: E402
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


@pytest.mark.parametrize("T,offset,b,causal", CASES, ids=lambda v: str(v))
def test_backward_local_stage_is_the_output_path(monkeypatch, T, offset, b, causal):
    monkeypatch.setattr(bwd, "MAX_BLOCK_M", 16)  # M = 40 in three tiles, the last one partly masked
    x = make(1, 2, T, 16, 40, b, offset, seed=T)
    f, args, sums, ckpt = launch_forward(x, offset, causal)
    loc = bwd.chunk_ttt_mlp_bwd_local(*args, ckpt, sums, f["do"], offset=offset, causal=causal, eps=EPS)
    ref = chunk_ttt_mlp_bwd_local_ref(x, ckpt, offset, b, causal)
    got = loc._asdict()
    got.update(dte=loc.dte.sum((0, 1, 2)), dln_w=loc.dln_w.sum((0, 2)), dln_b=loc.dln_b.sum((0, 2)))
    if not offset:  # the carried sums are inputs of segment 0 only when the call resumes mid-batch
        got.pop("dg0")
    assert_stage_matches(got, ref)


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
    ref = chunk_ttt_mlp_bwd_seq_ref(x, loc, dht, dgt, offset, b)
    got = dict(dk=dk.double() - loc.dk, dv=dv, dlr=dlr - loc.dlr, dte=dte - loc.dte.sum((0, 1, 2)),
               dln_w=dln_w - loc.dln_w.sum((0, 2)), dln_b=dln_b - loc.dln_b.sum((0, 2)), dh0=dh0,
               dg0=tuple(a - l for a, l in zip(dg0, loc.dg0)))  # fmt: skip
    # the carried sums' gradient is compared at offset 0 too: kernel and reference both take the zero sums
    assert_stage_matches(got, ref)
