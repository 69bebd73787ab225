"""``lact_online`` (the inner gradient written out) equals ``lact_recurrent`` (the inner gradient from
``torch.func``) in float64: forward and the gradients of q, k, v, the three initial fast weights and the
per-token lr, under every switch of the online recurrence."""

from __future__ import annotations

import pytest
import torch

import ttt
from ttt.ops.general import inner
from ttt.ops.kv_binding import lact_online, lact_recurrent

from .test_reduction import problem

ATOL = 1e-10

SWITCHES = [
    {},
    {"update_all": True},
    {"weight_norm": True},
    {"update_all": True, "weight_norm": True},  # the lact rows of the evidence recipe
    {"update_all": True, "weight_norm": True, "ascent": True},
    {"update_all": True, "weight_norm": True, "inner_steps": 2},
    {"update_all": True, "momentum": 0.7},
    {"momentum": 0.5, "ascent": True, "inner_steps": 3},
    {"loss": "mse", "update_all": True, "weight_norm": True},
    {"loss": "mse", "inner_steps": 2, "momentum": 0.3},
]


def _run(fn, x, **switches):
    return fn(x["q"], x["k"], x["v"], (x["W0"], x["W1"], x["W2"]), lr=x["lr"], **switches)


@pytest.mark.parametrize(
    "switches", SWITCHES, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()) or "base"
)
def test_online_equals_the_torch_func_oracle(switches):
    x = problem(T=13, D=4, M=6, grad=True)
    for n in ("q", "k"):  # unit norm, as the layer gives them: the weights stay O(1) over the sequence
        x[n] = torch.nn.functional.normalize(x[n].detach(), dim=-1).requires_grad_()
    x["v"] = x["v"][..., :3].detach().requires_grad_()  # Dv != D
    x["W1"] = x["W1"][..., :3].detach().requires_grad_()
    names = list(x)
    outs = []
    for fn in (lact_recurrent, lact_online):
        o = _run(fn, x, **switches)
        weights = torch.randn(o.shape, generator=torch.Generator().manual_seed(1), dtype=o.dtype)
        outs.append((o, torch.autograd.grad((o * weights).sum(), [x[n] for n in names])))
    (o_ref, g_ref), (o, g) = outs
    assert o.shape == o_ref.shape == (2, 2, 13, 3)
    torch.testing.assert_close(o, o_ref, atol=ATOL, rtol=0)
    for name, a, b in zip(names, g, g_ref):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0, msg=f"d/d{name}")


def test_constant_lr_and_empty_sequence():
    x = problem(T=7)
    ref = lact_recurrent(x["q"], x["k"], x["v"], (x["W0"], x["W1"], x["W2"]), lr=0.05, update_all=True)
    out = lact_online(x["q"], x["k"], x["v"], (x["W0"], x["W1"], x["W2"]), lr=0.05, update_all=True)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    empty = {n: x[n][:, :, :0] for n in ("q", "k", "v")}
    assert lact_online(empty["q"], empty["k"], empty["v"], (x["W0"], x["W1"], x["W2"])).shape == (2, 2, 0, 4)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"loss": "l1"}, "loss must be"), ({"inner_steps": 0}, "inner_steps"), ({"momentum": 1.0}, "momentum")],
)
def test_bad_switches_raise_one_line(kwargs, match):
    x = problem(T=3)
    with pytest.raises(ValueError, match=match):
        lact_online(x["q"], x["k"], x["v"], (x["W0"], x["W1"], x["W2"]), **kwargs)


@pytest.mark.parametrize("fn", [lact_recurrent, lact_online], ids=lambda f: f.__name__)
@pytest.mark.parametrize("update_all", [False, True])
def test_weight_norm_rescales_every_trained_fast_weight(fn, update_all):
    """LaCT rescales each trained fast weight (W0 and W2 as well as W1, with ``update_all``) back to its
    initial column norms after every step, as ``ttt_general(weight_norm=True)`` does at mini-batch 1.
    (Normalising W1 alone let W0 and W2 grow without bound under the dot loss, which is unbounded below:
    the ``lact`` row's training gradient overflowed to NaN within 31 steps.)"""
    x = problem(T=11, seed=3)
    for n in ("q", "k"):
        x[n] = torch.nn.functional.normalize(x[n], dim=-1)
    x["lr"] = 2.0 * x["lr"]  # large steps, so the norms matter
    want = ttt.ops.ttt_general(
        x["q"], x["k"], x["v"], model=inner.swiglu_no_bias, initial_state=(x["W0"][None], x["W1"][None], x["W2"][None]),
        loss="dot", lr=x["lr"], update=(update_all, True, update_all), weight_norm=True,
    ).output  # fmt: skip
    got = _run(fn, x, update_all=update_all, weight_norm=True)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("fn", [lact_recurrent, lact_online], ids=lambda f: f.__name__)
@pytest.mark.parametrize(
    "which, shape",
    [(0, (2, 3, 6)), (1, (2, 7, 4)), (2, (3, 4, 6)), (1, (2, 6, 4, 1))],
    ids=["W0-input", "W1-hidden", "W2-heads", "W1-rank"],
)
def test_fast_weights_of_the_wrong_shape_are_refused_in_one_line(fn, which, shape):
    """A W1 with another hidden width (or W2 with other heads) failed inside a matmul with torch's own
    message, naming neither the weight nor the shape expected."""
    x = problem(T=5, D=4, M=6)
    params = [x["W0"], x["W1"], x["W2"]]
    params[which] = torch.zeros(shape, dtype=torch.float64)
    with pytest.raises(ValueError, match=rf"^W{which} must be \["):
        fn(x["q"], x["k"], x["v"], tuple(params))
