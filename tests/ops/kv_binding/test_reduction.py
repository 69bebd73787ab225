"""KV-binding TTT == linear attention (Liu et al. 2026): the chunk-parallel form of the reduced layer
equals the TTT recurrence in float64 (forward and gradients), under each ablation switch that keeps
the form; the switches that break it are shown to break it."""

from __future__ import annotations

import pytest
import torch

import ttt
from ttt.ops.general import inner
from ttt.ops.kv_binding import kv_binding_parallel, lact_recurrent, reduce_kv_binding, swiglu_features

ATOL = 1e-10


def problem(B=2, H=2, T=29, D=4, M=6, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    x = {
        "q": r(B, H, T, D),
        "k": r(B, H, T, D),
        "v": r(B, H, T, D),
        "lr": 0.1 * torch.rand(B, H, T, generator=g, dtype=torch.float64),
        "W0": r(H, D, M),
        "W1": 0.3 * r(H, M, D),
        "W2": r(H, D, M),
    }
    return {n: t.requires_grad_(grad) for n, t in x.items()}


def parallel(x, *, q=None, chunk_size=8, **switches):
    eff = reduce_kv_binding(
        x["q"] if q is None else q,
        x["k"],
        x["v"],
        features=swiglu_features(x["W0"], x["W2"]),
        lr=x["lr"],
        **switches,
    )
    return kv_binding_parallel(eff, x["W1"][None], chunk_size=chunk_size)[0]


def recurrent(x, *, q=None, lr=None, **switches):
    return lact_recurrent(x["q"] if q is None else q, x["k"], x["v"], (x["W0"], x["W1"], x["W2"]),
                          lr=x["lr"] if lr is None else lr, **switches)  # fmt: skip


KEEPS_THE_FORM = [
    {},
    {"ascent": True},
    {"inner_steps": 3},
    {"momentum": 0.8},
    {"momentum": 0.5, "ascent": True, "inner_steps": 2},
]


@pytest.mark.parametrize(
    "switches", KEEPS_THE_FORM, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()) or "base"
)
def test_parallel_equals_recurrence(switches):
    x = problem()
    assert (parallel(x, **switches) - recurrent(x, **switches)).abs().max().item() < ATOL


def test_queries_replaced_by_keys_keep_the_form():
    x = problem(seed=1)
    assert (parallel(x, q=x["k"]) - recurrent(x, q=x["k"])).abs().max().item() < ATOL


def test_constant_learning_rate_keeps_the_form():
    x = problem(seed=2)
    x["lr"] = torch.full_like(x["lr"], 0.05)
    assert (parallel(x) - recurrent(x, lr=0.05)).abs().max().item() < ATOL


@pytest.mark.parametrize("chunk_size", [1, 5, 64])
def test_chunk_sizes_and_momentum(chunk_size):
    x = problem(T=23, seed=3)
    assert (
        parallel(x, chunk_size=chunk_size, momentum=0.9) - recurrent(x, momentum=0.9)
    ).abs().max().item() < ATOL


@pytest.mark.parametrize("switches", [{}, {"momentum": 0.7}], ids=["base", "momentum"])
def test_gradients_match(switches):
    """d(o . do) w.r.t. q, k, v, lr and all three fast-weight matrices."""
    x = problem(T=13, grad=True)
    do = torch.randn(2, 2, 13, 4, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    names = list(x)
    g_par = torch.autograd.grad((parallel(x, **switches) * do).sum(), [x[n] for n in names])
    g_rec = torch.autograd.grad((recurrent(x, **switches) * do).sum(), [x[n] for n in names])
    for n, a, b in zip(names, g_par, g_rec):
        assert (a - b).abs().max().item() < ATOL, n


@pytest.mark.parametrize(
    "switches", [{}, {"ascent": True}, {"momentum": 0.6}], ids=["base", "ascent", "momentum"]
)
def test_general_operator_agrees(switches):
    """The lead's ttt_general (last layer only, dot loss) is the same recurrence."""
    x = problem(seed=4)
    out = ttt.ops.ttt_general(
        x["q"], x["k"], x["v"], model=inner.swiglu_no_bias, initial_state=(x["W0"][None], x["W1"][None], x["W2"][None]),
        loss="dot", lr=x["lr"], update=(False, True, False), **switches,
    ).output  # fmt: skip
    assert (out - parallel(x, **switches)).abs().max().item() < ATOL


def test_ascent_is_descent_with_negated_values():
    x = problem(seed=5)
    flipped = dict(x, v=-x["v"])
    assert (recurrent(x, ascent=True) - recurrent(flipped)).abs().max().item() < 1e-12


@pytest.mark.parametrize("switch", ["update_all", "weight_norm"])
def test_switches_that_break_the_form(switch):
    """Training W0/W2 makes phi change over time (phi_t(k) in Thm 5.2 is no longer one fixed map), and
    weight normalisation rescales W1 by a state-dependent factor after every step (not a sum of
    per-token terms): the static-kernel parallel form no longer equals the recurrence."""
    x = problem(seed=6)
    gap = (parallel(x) - recurrent(x, **{switch: True})).abs().max().item()
    assert gap > 1e-3


def test_mse_loss_is_deltanet_over_features():
    """With the MSE loss the value depends on the state (v^ = lr (v - phi(k) W)): the layer is the
    delta rule over the features, still chunk-parallel through the WY form of ttt.ops.deltanet."""
    x = problem(seed=7)
    phi = swiglu_features(x["W0"], x["W2"])
    B = x["q"].shape[0]
    o_delta, _ = ttt.ops.deltanet(phi(x["q"]), phi(x["k"]), x["v"], beta=x["lr"], scale=1.0,
                                  initial_state=x["W1"][None].expand(B, -1, -1, -1), chunk_size=8)  # fmt: skip
    assert (o_delta - recurrent(x, loss="mse")).abs().max().item() < ATOL
    assert (parallel(x) - recurrent(x, loss="mse")).abs().max().item() > 1e-3


def test_final_state_chains():
    """Two calls, the second from the first's (W, V), equal one call (momentum included)."""
    x = problem(T=30, seed=8)
    phi = swiglu_features(x["W0"], x["W2"])
    eff = reduce_kv_binding(x["q"], x["k"], x["v"], features=phi, lr=x["lr"], momentum=0.7)
    o, (W, V) = kv_binding_parallel(eff, x["W1"][None], chunk_size=8, output_final_state=True)
    cut = lambda e, s: type(e)(e.q[:, :, s], e.k[:, :, s], e.v[:, :, s], e.momentum)  # noqa: E731
    o1, (W1, V1) = kv_binding_parallel(
        cut(eff, slice(0, 13)), x["W1"][None], chunk_size=8, output_final_state=True
    )
    o2, (W2, V2) = kv_binding_parallel(
        cut(eff, slice(13, 30)), W1, velocity=V1, chunk_size=8, output_final_state=True
    )
    assert (torch.cat([o1, o2], 2) - o).abs().max().item() < ATOL
    assert (W2 - W).abs().max().item() < ATOL and (V2 - V).abs().max().item() < ATOL


def test_long_momentum_sequence_stays_finite():
    """mu^T underflows float32 for T = 20000, mu = 0.99 (1e-87): dividing by the cumulative product of
    the momentum factors (the reference implementation) gives inf; the Toeplitz weights do not."""
    g = torch.Generator().manual_seed(0)
    B, H, T, M = 1, 1, 20000, 4
    q, k, v = (torch.randn(B, H, T, M, generator=g) for _ in range(3))
    eff = reduce_kv_binding(q, k, v, features=lambda z: z, lr=0.01, momentum=0.99)
    with torch.no_grad():
        o, (W, V) = kv_binding_parallel(eff, torch.zeros(1, H, M, M), output_final_state=True)
    assert torch.isfinite(o).all() and torch.isfinite(W).all()
    assert (0.99**T) == 0.0 or torch.tensor(0.99, dtype=torch.float32) ** T == 0


def test_bad_input():
    x = problem()
    phi = swiglu_features(x["W0"], x["W2"])
    with pytest.raises(ValueError, match=r"lr must have shape \[B, H, T\]"):
        reduce_kv_binding(x["q"], x["k"], x["v"], features=phi, lr=x["lr"][..., :3])
    with pytest.raises(ValueError, match=r"momentum must be a finite number in \[0, 1\)"):
        reduce_kv_binding(x["q"], x["k"], x["v"], features=phi, momentum=1.0)
    with pytest.raises(ValueError, match="inner_steps must be a positive int"):
        reduce_kv_binding(x["q"], x["k"], x["v"], features=phi, inner_steps=0)
    with pytest.raises(ValueError, match=r"q and k must have the same shape \[B, H, T, D\]"):
        reduce_kv_binding(x["q"], x["k"][:, :1], x["v"], features=phi)


@pytest.mark.parametrize(
    "b, causal, momentum",
    [(8, True, 0.0), (8, False, 0.0), (8, True, 0.7), (5, False, 0.5), (1, False, 0.0)],
)
def test_mini_batch_parallel_equals_general_operator(b, causal, momentum):
    """Mini-batch TTT (gradients at the mini-batch start, token_eta = 1/(i+1), momentum between
    mini-batches, causal or update-then-apply) is masked linear attention too; T = 29 leaves a partial
    last mini-batch."""
    x = problem(seed=10)
    eff = reduce_kv_binding(x["q"], x["k"], x["v"], features=swiglu_features(x["W0"], x["W2"]), lr=x["lr"],
                            momentum=momentum)  # fmt: skip
    o, _ = kv_binding_parallel(eff, x["W1"][None], mini_batch_size=b, causal=causal)
    want = ttt.ops.ttt_general(
        x["q"], x["k"], x["v"], model=inner.swiglu_no_bias, initial_state=(x["W0"][None], x["W1"][None], x["W2"][None]),
        loss="dot", lr=x["lr"], update=(False, True, False), mini_batch_size=b, causal=causal, momentum=momentum,
    ).output  # fmt: skip
    assert (o - want).abs().max().item() < ATOL
