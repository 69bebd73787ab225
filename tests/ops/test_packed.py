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


@pytest.mark.parametrize("impl", ["chunk", "recurrent", "reference"])
def test_packed_sequences_ending_at_different_offsets_return_their_states(impl):
    """Each sequence's final state at its own offset (one TTTState offset per row); continuing the rows
    together equals continuing each alone (this used to raise)."""
    x = packed_inputs("linear")
    cu, lengths = torch.tensor([0, 5, 11, 12, 28]), [5, 6, 1, 16]
    lin = lambda q, k, v, lr, **kw: ttt.ops.ttt_linear(q, k, v, lr, x["ln_weight"], x["ln_bias"],  # noqa: E731
                                                       mini_batch_size=4, output_final_state=True, impl=impl, **kw)  # fmt: skip
    got = lin(x["q"], x["k"], x["v"], x["lr"], initial_state=x["initial_state"], cu_seqlens=cu)
    assert got.final_state.offset == (1, 2, 1, 0)
    nxt = ttt_inputs(4, 2, 3, 4, seed=5)
    cont = lin(nxt["q"], nxt["k"], nxt["v"], nxt["lr"], initial_state=got.final_state)
    assert cont.final_state.offset == (0, 1, 0, 3)
    for n, (q, k, v, lr) in enumerate(
        zip(*(t.split(lengths, dim=2) for t in (x["q"], x["k"], x["v"], x["lr"])))
    ):
        one = lin(q, k, v, lr, initial_state=tuple(t[n : n + 1] for t in x["initial_state"]))
        for field in ("weights", "anchor", "grad_sum"):
            mine = tuple(w[n : n + 1] for w in getattr(got.final_state, field))
            assert max_abs_diff(mine, getattr(one.final_state, field)) < 1e-12
        row = slice(n, n + 1)
        one = lin(nxt["q"][row], nxt["k"][row], nxt["v"][row], nxt["lr"][row], initial_state=one.final_state)
        assert max_abs_diff(cont.output[row], one.output) < 1e-12


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
