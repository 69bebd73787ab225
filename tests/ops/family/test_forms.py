"""(a) autograd-from-objective == (b) closed-form recurrence == (c) chunk form, float64, forward and
every gradient (inputs, gates, initial state; the loss also reads the final state)."""

from __future__ import annotations

import pytest
import torch
from family_cases import ALL_RULES, grads, make_case

ATOL = 1e-10  # fp64 reference-vs-reference; observed errors are ~1e-14


def _max_err(a, b) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("rule", ALL_RULES)
def test_autograd_recurrent_chunk_agree(rule):
    case = make_case(rule, T=19)
    o_a, S_a, g_a = grads(case, "autograd")
    for impl in ("recurrent", "chunk"):
        o, S, g = grads(case, impl, chunk_size=8)
        assert _max_err(o, o_a) < ATOL, f"{rule} {impl}: output"
        assert _max_err(S, S_a) < ATOL, f"{rule} {impl}: final state"
        for name in g_a:
            assert _max_err(g[name], g_a[name]) < ATOL, f"{rule} {impl}: d{name}"


@pytest.mark.parametrize("chunk_size", [1, 3, 8, 64])
@pytest.mark.parametrize(
    "rule", ["linear_attention", "gla", "gated_deltanet", "kda", "longhorn_per_column", "rwkv7"]
)
def test_chunk_sizes(rule, chunk_size):
    case = make_case(rule, T=21, seed=3)
    o_r, S_r, g_r = grads(case, "recurrent")
    o_c, S_c, g_c = grads(case, "chunk", chunk_size=chunk_size)
    assert _max_err(o_c, o_r) < ATOL and _max_err(S_c, S_r) < ATOL
    for name in g_r:
        assert _max_err(g_c[name], g_r[name]) < ATOL, name


@pytest.mark.parametrize("rule", ["deltanet", "gated_deltanet", "kda", "comba", "rwkv7", "gla"])
@pytest.mark.parametrize("split", [1, 8, 13])
def test_split_sequence_state_passing(rule, split):
    """Running [0, split) then [split, T) from the returned state equals one call."""
    case = make_case(rule, T=20, seed=5)
    full_o, full_S = case.run("chunk")
    L = case.leaves
    T = L["q"].shape[2]

    def part(x, sl):
        return x[:, :, sl] if x.dim() >= 3 and x.shape[2] == T else x

    import ttt.ops.family as fam

    op = getattr(fam, rule)
    first = {n: part(x, slice(0, split)) for n, x in L.items()}
    o1, S1 = op(**first, output_final_state=True, chunk_size=8)
    second = {n: part(x, slice(split, T)) for n, x in L.items()}
    second["initial_state"] = S1
    o2, S2 = op(**second, output_final_state=True, chunk_size=8)
    assert _max_err(torch.cat([o1, o2], dim=2), full_o) < ATOL
    assert _max_err(S2, full_S) < ATOL


@pytest.mark.parametrize("rule", ["gated_deltanet", "gla", "rwkv7"])
def test_batch_invariance(rule):
    """Each sequence of a batch gives what it gives alone."""
    case = make_case(rule, B=3, T=17, seed=7)
    o, S = case.run("chunk")
    L = case.leaves
    for b in range(3):
        one = {n: (x[b : b + 1] if x.dim() >= 3 else x) for n, x in L.items()}
        ob, Sb = make_case.__globals__["fam"].__dict__[rule](**one, output_final_state=True, chunk_size=8)
        assert _max_err(ob, o[b : b + 1]) < ATOL and _max_err(Sb, S[b : b + 1]) < ATOL


def test_zero_learning_rate_is_the_static_state():
    """beta = 0 (and no decay) leaves S_0 untouched: o_t = S_0^T q_t for every form."""
    case = make_case("gated_deltanet", T=9)
    L = case.leaves
    import ttt.ops.family as fam

    for impl in ("autograd", "recurrent", "chunk"):
        o, S = fam.gated_deltanet(
            L["q"],
            L["k"],
            L["v"],
            beta=torch.zeros_like(L["beta"]),
            alpha=torch.ones_like(L["alpha"]),
            initial_state=L["initial_state"],
            output_final_state=True,
            impl=impl,
        )
        expected = torch.einsum("bhtk,bhkv->bhtv", L["q"] * L["q"].shape[-1] ** -0.5, L["initial_state"])
        assert _max_err(o, expected) < ATOL and _max_err(S, L["initial_state"]) < ATOL


def test_linear_attention_is_masked_attention():
    case = make_case("linear_attention", T=11, with_state=False)
    L = case.leaves
    o, _ = case.run("chunk")
    scores = (L["q"] @ L["k"].transpose(-1, -2)).tril() * L["q"].shape[-1] ** -0.5
    assert _max_err(o, scores @ L["v"]) < ATOL


@pytest.mark.parametrize("impl, target", [("chunk", "chunk_transition"), ("recurrent", "recurrent_transition"),
                                          ("autograd", "autograd_rule")])  # fmt: skip
def test_the_chosen_form_runs(impl, target, monkeypatch):
    """impl= is honoured: the named form (and only it) is called."""
    import ttt.ops.family.dispatch as dispatch

    calls = {name: 0 for name in ("chunk_transition", "recurrent_transition", "autograd_rule")}
    for name in calls:
        original = getattr(dispatch, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(dispatch, name, counted)
    make_case("kda", T=5).run(impl)
    assert calls == {name: int(name == target) for name in calls}
