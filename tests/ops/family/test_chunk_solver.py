"""The chunk form's UT-transform pieces against their plain references, float64, forward and gradients:
the blocked inverse ``(I + L)^{-1}`` against ``torch.linalg.solve_triangular``, and the whole chunk form
against the recurrence at chunk sizes where the inverse recurses (C > 16, even and odd halves) with T
spanning several chunks and a padded tail."""

from __future__ import annotations

import pytest
import torch
from family_cases import grads, make_case

import ttt.ops.family
import ttt.ops.family.chunk as chunk

ATOL = 1e-10


def _max_err(a, b) -> float:
    return (a - b).abs().max().item()


def _reference_inverse(L: torch.Tensor) -> torch.Tensor:
    eye = torch.eye(L.shape[-1], dtype=L.dtype)
    return torch.linalg.solve_triangular(eye + L.tril(-1), eye.expand_as(L), upper=False)


@pytest.mark.parametrize("C", [1, 5, 16, 17, 24, 33, 48, 64, 100])
def test_unit_lower_inverse_matches_triangular_solve(C):
    g = torch.Generator().manual_seed(C)
    # |L| <= 1 as the delta rows produce with unit keys and beta <= 1 (the inverse's entries then grow
    # to ~1e6 at C = 100: the budget is relative); the upper triangle holds garbage to be ignored
    L = (2 * torch.rand(3, 2, C, C, generator=g, dtype=torch.float64) - 1).requires_grad_(True)
    weights = torch.randn(3, 2, C, C, generator=g, dtype=torch.float64)

    got = chunk.unit_lower_inverse(L)
    want = _reference_inverse(L)
    assert _max_err(got, want) < ATOL * want.abs().max().item()
    assert torch.equal(got.triu(1), torch.zeros_like(got))  # exactly lower-triangular
    (dL_got,) = torch.autograd.grad((got * weights).sum(), L)
    (dL_want,) = torch.autograd.grad((want * weights).sum(), L)
    assert _max_err(dL_got, dL_want) <= ATOL * dL_want.abs().max().item()
    assert torch.equal(dL_got.triu(), torch.zeros_like(dL_got))  # the ignored part gets no gradient


DELTA_ROWS = ["deltanet", "gated_deltanet", "kda", "longhorn", "longhorn_per_column", "comba", "rwkv7"]


@pytest.mark.parametrize("chunk_size", [17, 33, 48, 64])
@pytest.mark.parametrize("rule", DELTA_ROWS)
def test_chunk_equals_recurrence_with_recursive_inverse(rule, chunk_size):
    case = make_case(rule, B=1, H=2, T=150, Dk=6, Dv=3, seed=11)
    o_r, S_r, g_r = grads(case, "recurrent")
    o_c, S_c, g_c = grads(case, "chunk", chunk_size=chunk_size)
    assert _max_err(o_c, o_r) < ATOL and _max_err(S_c, S_r) < ATOL
    for name in g_r:
        assert _max_err(g_c[name], g_r[name]) < ATOL, name


@pytest.mark.parametrize(
    "rule, products", [("deltanet", 2), ("gated_deltanet", 2), ("kda", 2), ("comba", 2), ("rwkv7", 4)]
)
def test_shared_key_products_are_formed_once(rule, products, monkeypatch):
    """Rules whose correction removes along the key it writes (DeltaNet, GDN, KDA, Comba: beta k for
    both) need two [C, C] products per chunk (queries and reads against that key); RWKV7 removes along
    its own key k_hat, so reads and queries meet both keys."""
    calls = []
    original = chunk._decayed_products
    monkeypatch.setattr(chunk, "_decayed_products", lambda *a: calls.append(1) or original(*a))
    make_case(rule, T=20).run("chunk", chunk_size=8)
    assert len(calls) == products


@pytest.mark.parametrize("rule", DELTA_ROWS + ["gla", "mamba2"])
@pytest.mark.parametrize("T, chunk_size", [(70, 32), (70, 17), (1, 64)], ids=["T70-C32", "T70-C17", "T1-C64"])
def test_no_grad_forward_equals_the_recorded_one(rule, T, chunk_size):
    """Without autograd the chunk form overwrites some of its buffers in place; same numbers (also with a
    chunk that is not a multiple of the inverse's 16-blocks, and one token in a large chunk)."""
    case = make_case(rule, T=T, seed=4)
    o, S = case.run("chunk", chunk_size=chunk_size)
    with torch.no_grad():
        o_ng, S_ng = case.run("chunk", chunk_size=chunk_size)
    assert _max_err(o_ng, o.detach()) < ATOL and _max_err(S_ng, S.detach()) < ATOL


@pytest.mark.parametrize("rule", ["gated_deltanet", "kda", "mamba2"])
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("chunk_size", [17, 32])
def test_inputs_are_left_alone(rule, grad, chunk_size):
    """The chunk form works in place on its own buffers only: a float32 log-decay and initial state
    passed straight in come back with the same values and version counters."""
    g = torch.Generator().manual_seed(3)
    B, H, T, D = 1, 2, 40, 8
    q, k, v = (torch.randn(B, H, T, D, generator=g) for _ in range(3))
    k = torch.nn.functional.normalize(k, dim=-1)
    shape = (B, H, T, D) if rule == "kda" else (B, H, T)
    log_alpha = (-torch.rand(*shape, generator=g) * 0.2).requires_grad_(grad)
    S0 = torch.randn(B, H, D, D, generator=g).requires_grad_(grad)
    gates = dict(log_alpha=log_alpha, beta=torch.rand(B, H, T, generator=g))
    before = [(t.detach().clone(), t._version) for t in (log_alpha, S0)]
    with torch.set_grad_enabled(grad):
        o, S = getattr(ttt.ops.family, rule)(q, k, v, **gates, initial_state=S0, output_final_state=True,
                                             impl="chunk", chunk_size=chunk_size)  # fmt: skip
    for t, (value, version) in zip((log_alpha, S0), before):
        assert t._version == version
        torch.testing.assert_close(t.detach(), value, rtol=0, atol=0)
    assert S.data_ptr() != S0.data_ptr()
