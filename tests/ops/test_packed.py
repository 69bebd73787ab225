"""Sequences packed along T with ``cu_seqlens`` == one call per sequence, in every form."""

import pytest
import torch

import ttt
from ttt.testing import max_abs_diff, ttt_inputs

LENGTHS = [5, 13, 1, 9]  # offsets after b = 4: 1, 1, 1, 1 -> one final state


def packed_inputs(variant, dtype=torch.float64):
    x = ttt_inputs(1, 2, sum(LENGTHS), 4, hidden=None if variant == "linear" else 6, dtype=dtype)
    # a different initial state per sequence
    x["initial_state"] = tuple(
        torch.stack([t * (1 + 0.1 * n) for n in range(len(LENGTHS))]) for t in x["initial_state"]
    )
    return x


@pytest.mark.parametrize(
    "variant,impl,dtype",
    [
        ("linear", "chunk", torch.float64),
        ("linear", "reference", torch.float64),
        ("linear", "recurrent", torch.float64),
        ("linear", "triton", torch.float32),
        ("mlp", "chunk", torch.float64),
        ("mlp", "reference", torch.float64),
    ],
)
def test_packed_equals_one_call_per_sequence(variant, impl, dtype):
    op = ttt.ops.ttt_linear if variant == "linear" else ttt.ops.ttt_mlp
    x = packed_inputs(variant, dtype)
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()])

    def args(sl):
        return (
            x["q"][:, :, sl],
            x["k"][:, :, sl],
            x["v"][:, :, sl],
            x["lr"][:, :, sl],
            x["ln_weight"],
            x["ln_bias"],
        )  # noqa: E731

    got = op(*args(slice(None)), initial_state=x["initial_state"], mini_batch_size=4, cu_seqlens=cu, impl=impl,
             output_final_state=True)  # fmt: skip
    start = 0
    for n, length in enumerate(LENGTHS):
        sl = slice(start, start + length)
        one = op(*args(sl), initial_state=tuple(t[n : n + 1] for t in x["initial_state"]), mini_batch_size=4,
                 output_final_state=True, impl="chunk" if impl == "triton" else impl)  # fmt: skip
        tol = 1e-10 if dtype == torch.float64 else 1e-4
        assert max_abs_diff(got.output[:, :, sl], one.output) < tol
        assert (
            max_abs_diff(tuple(w[n : n + 1] for w in got.final_state.weights), one.final_state.weights) < tol
        )
        start += length


def test_packed_final_state_needs_one_offset():
    x = packed_inputs("linear")
    cu = torch.tensor([0, 5, 11, 12, 28])
    with pytest.raises(ValueError, match="end at different positions of a mini-batch"):
        ttt.ops.ttt_linear(x["q"], x["k"], x["v"], x["lr"], x["ln_weight"], x["ln_bias"], initial_state=x["initial_state"],
                           mini_batch_size=4, cu_seqlens=cu, output_final_state=True)  # fmt: skip
    o, _ = ttt.ops.ttt_linear(x["q"], x["k"], x["v"], x["lr"], x["ln_weight"], x["ln_bias"],
                              initial_state=x["initial_state"], mini_batch_size=4, cu_seqlens=cu)  # fmt: skip
    assert o.shape == x["q"].shape


@pytest.mark.parametrize(
    "cu,match",
    [
        (torch.tensor([0, 5, 27]), "must rise from 0 to T=28"),
        (torch.tensor([0.0, 28.0]), "1-D int32/int64"),
        (torch.tensor([0, 20, 10, 28]), "must rise from 0"),
    ],
)
def test_bad_cu_seqlens(cu, match):
    x = packed_inputs("linear")
    with pytest.raises(ValueError, match=match):
        ttt.ops.ttt_linear(x["q"], x["k"], x["v"], x["lr"], x["ln_weight"], x["ln_bias"],
                           initial_state=tuple(t[:2] for t in x["initial_state"]), cu_seqlens=cu)  # fmt: skip
