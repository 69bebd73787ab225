"""Property test: for random shapes, chunk sizes and rules, the chunk form equals the closed-form
recurrence (float64, forward and final state). Complements the fixed-shape gradient tests."""

from __future__ import annotations

import torch
from family_cases import ALL_RULES, make_case
from hypothesis import given, settings
from hypothesis import strategies as st


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    rule=st.sampled_from(ALL_RULES),
    B=st.integers(1, 2),
    H=st.integers(1, 2),
    T=st.integers(1, 70),
    Dk=st.integers(1, 7),
    Dv=st.integers(1, 6),
    chunk_size=st.one_of(st.integers(1, 24), st.sampled_from([32, 48])),  # 32, 48: sub-blocked decays
    seed=st.integers(0, 2**16),
)
def test_chunk_equals_recurrence(rule, B, H, T, Dk, Dv, chunk_size, seed):
    case = make_case(rule, B=B, H=H, T=T, Dk=Dk, Dv=Dv, seed=seed)
    with torch.no_grad():
        o_r, S_r = case.run("recurrent")
        o_c, S_c = case.run("chunk", chunk_size=chunk_size)
    assert (o_c - o_r).abs().max().item() < 1e-10
    assert (S_c - S_r).abs().max().item() < 1e-10
