"""LaCT's shifted block-causal chunks (chunk i answered with the weights from chunks < i, then one step
on chunk i), with momentum and Muon: the parallel form (``shifted.py``) equals the TTT recurrence with
the inner gradient from torch.func, in float64, forward and gradients."""

from __future__ import annotations

import pytest
import torch

from ttt.ops.kv_binding import kv_binding_parallel, lact_recurrent, reduce_kv_binding, swiglu_features

from .test_reduction import ATOL, problem

# (momentum, muon): every combination; LaCT's LLM runs momentum with and without Muon
OPTIMISERS = [(0.0, False), (0.7, False), (0.0, True), (0.7, True)]
OPT_IDS = ["plain", "momentum", "muon", "momentum-muon"]


def reduced(x, *, momentum=0.0, ascent=False, inner_steps=1):
    return reduce_kv_binding(x["q"], x["k"], x["v"], features=swiglu_features(x["W0"], x["W2"]), lr=x["lr"],
                             momentum=momentum, ascent=ascent, inner_steps=inner_steps)  # fmt: skip


def parallel(x, C, *, muon=False, momentum=0.0, **switches):
    eff = reduced(x, momentum=momentum, **switches)
    return kv_binding_parallel(eff, x["W1"][None], shifted_chunk_size=C, muon=muon)[0]


def recurrent(x, C, **switches):
    return lact_recurrent(x["q"], x["k"], x["v"], (x["W0"], x["W1"], x["W2"]), lr=x["lr"],
                          shifted_chunk_size=C, **switches)  # fmt: skip


@pytest.mark.parametrize("momentum, muon", OPTIMISERS, ids=OPT_IDS)
@pytest.mark.parametrize("T", [29, 32], ids=["partial-last-chunk", "whole-chunks"])
def test_parallel_equals_recurrence(T, momentum, muon):
    x = problem(T=T)
    sw = {"momentum": momentum, "muon": muon}
    assert (parallel(x, 8, **sw) - recurrent(x, 8, **sw)).abs().max().item() < ATOL


@pytest.mark.parametrize("muon", [False, True], ids=["plain", "muon"])
def test_ascent_and_inner_steps_keep_the_form(muon):
    """Both only scale v^ (by -1, by n); Newton-Schulz is odd, and blind to the scale n."""
    x = problem(seed=1)
    sw = {"momentum": 0.5, "ascent": True, "inner_steps": 3, "muon": muon}
    assert (parallel(x, 5, **sw) - recurrent(x, 5, **sw)).abs().max().item() < ATOL


@pytest.mark.parametrize("momentum, muon", OPTIMISERS, ids=OPT_IDS)
def test_gradients_match(momentum, muon):
    """d(o . do) w.r.t. q, k, v, lr and the initial fast weights (W1 the state, W0/W2 the features);
    T = 13, C = 4 leaves a one-token last chunk. Relative to each gradient's largest entry: Muon divides
    by ||V||_F (proportional to lr), so d/d lr reaches ~2e3 here (measured: <= 2.7e-14 relative)."""
    x = problem(T=13, grad=True)
    do = torch.randn(2, 2, 13, 4, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    names, sw = list(x), {"momentum": momentum, "muon": muon}
    g_par = torch.autograd.grad((parallel(x, 4, **sw) * do).sum(), [x[n] for n in names])
    g_rec = torch.autograd.grad((recurrent(x, 4, **sw) * do).sum(), [x[n] for n in names])
    for n, a, b in zip(names, g_par, g_rec):
        assert (a - b).abs().max().item() < 1e-12 * max(1.0, b.abs().max().item()), n


def test_is_chunk_strict_masked_linear_attention():
    """Without Muon: o = q^ W_0 + ((q^ k^T) * M) v^ with M[t, i] = [i // C < t // C]: the causal mask
    with each chunk's diagonal block removed (Liu et al. 2026, Sec. 6.2)."""
    x = problem(T=29, seed=2)
    eff, C = reduced(x), 8
    chunk = torch.arange(29) // C
    mask = (chunk[None, :] < chunk[:, None]).to(torch.float64)
    want = eff.q @ x["W1"][None] + ((eff.q @ eff.k.mT) * mask) @ eff.v
    assert (parallel(x, C) - want).abs().max().item() < ATOL


@pytest.mark.parametrize("muon", [False, True], ids=["plain", "muon"])
def test_one_chunk_reads_the_initial_weights(muon):
    """C >= T: every query is answered before any update, so the layer is the static f_{W_0}."""
    x = problem(T=13, seed=3)
    static = swiglu_features(x["W0"], x["W2"])(x["q"]) @ x["W1"][None]
    assert (parallel(x, 16, momentum=0.7, muon=muon) - static).abs().max().item() < ATOL


@pytest.mark.parametrize("T", [32, 29], ids=["whole-chunks", "partial-last-chunk"])
def test_final_state_chains(T):
    """Two calls split at a chunk boundary, the second from the first's (W, V), equal one call; the
    final state sits at the last chunk boundary (a partial last chunk has not taken its step)."""
    x = problem(T=T, seed=4)
    eff = reduced(x, momentum=0.7)

    def run(e, W, V=None):
        return kv_binding_parallel(e, W, velocity=V, shifted_chunk_size=8, muon=True, output_final_state=True)

    cut = lambda s: type(eff)(eff.q[:, :, s], eff.k[:, :, s], eff.v[:, :, s], eff.momentum)  # noqa: E731
    o, (W, V) = run(eff, x["W1"][None])
    o1, (W1, V1) = run(cut(slice(0, 16)), x["W1"][None])
    o2, (W2, V2) = run(cut(slice(16, T)), W1, V1)
    assert (torch.cat([o1, o2], 2) - o).abs().max().item() < ATOL
    assert (W2 - W).abs().max().item() < ATOL and (V2 - V).abs().max().item() < ATOL
    if T % 8:
        _, (W_cut, V_cut) = run(cut(slice(0, T - T % 8)), x["W1"][None])
        assert (W_cut - W).abs().max().item() < ATOL and (V_cut - V).abs().max().item() < ATOL


def test_low_precision_newton_schulz():
    """``muon_dtype`` runs only Newton-Schulz in that dtype (LaCT: bfloat16); the output keeps q's."""
    x = problem(T=29, seed=5)
    eff = reduced(x, momentum=0.7)
    exact, _ = kv_binding_parallel(eff, x["W1"][None], shifted_chunk_size=8, muon=True)
    low, _ = kv_binding_parallel(
        eff, x["W1"][None], shifted_chunk_size=8, muon=True, muon_dtype=torch.float32
    )
    assert low.dtype == torch.float64
    assert 0 < (low - exact).abs().max().item() < 1e-4 * exact.abs().max().item()


def test_bad_combinations():
    x = problem(T=9)
    eff = reduced(x)
    W = x["W1"][None]
    with pytest.raises(ValueError, match="muon=True needs chunked updates"):
        kv_binding_parallel(eff, W, muon=True)
    with pytest.raises(ValueError, match="muon=True needs chunked updates"):
        kv_binding_parallel(eff, W, mini_batch_size=4, muon=True)
    with pytest.raises(ValueError, match="muon=True needs chunked updates"):
        lact_recurrent(x["q"], x["k"], x["v"], (x["W0"], x["W1"], x["W2"]), muon=True)
    with pytest.raises(ValueError, match="leave mini_batch_size=1 and causal=True"):
        kv_binding_parallel(eff, W, shifted_chunk_size=4, mini_batch_size=4)
    with pytest.raises(ValueError, match="leave mini_batch_size=1 and causal=True"):
        kv_binding_parallel(eff, W, shifted_chunk_size=4, causal=False)
    with pytest.raises(ValueError, match="shifted_chunk_size must be a positive int"):
        kv_binding_parallel(eff, W, shifted_chunk_size=0)
