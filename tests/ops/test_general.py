"""The general operator: it reproduces TTT-Linear/MLP and implements each inner-loop option exactly."""

import pytest
import torch

import ttt
from ttt.ops.general import inner
from ttt.testing import max_abs_diff, ttt_inputs


def as_general(x, model, **kw):
    return ttt.ops.ttt_general(
        x["q"], x["k"], x["v"], model=model, initial_state=tuple(t[None] for t in x["initial_state"]),
        loss=inner.ln_residual_mse(1e-6), readout=inner.ln_residual_readout(model, 1e-6),
        head_args=(x["ln_weight"], x["ln_bias"]), lr=x["lr"], **kw,
    )  # fmt: skip


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("variant", ["linear", "mlp"])
def test_general_operator_reproduces_ttt_linear_and_mlp(variant, causal):
    x = ttt_inputs(2, 2, 13, 5, hidden=None if variant == "linear" else 7)
    op, model = (ttt.ops.ttt_linear, inner.linear) if variant == "linear" else (ttt.ops.ttt_mlp, inner.mlp)
    want = op(x["q"], x["k"], x["v"], x["lr"], x["ln_weight"], x["ln_bias"], initial_state=x["initial_state"],
              mini_batch_size=4, causal=causal, output_final_state=True)  # fmt: skip
    got = as_general(x, model, mini_batch_size=4, causal=causal, output_final_state=True)
    assert max_abs_diff(got.output, want.output) < 1e-10
    assert max_abs_diff(got.final_state.weights, want.final_state.weights) < 1e-10


def dot_inputs(T=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 2, T, 4, generator=g, dtype=torch.float64) for _ in range(3))
    W = torch.randn(1, 2, 4, 4, generator=g, dtype=torch.float64) * 0.3
    lr = torch.rand(1, 2, T, generator=g, dtype=torch.float64)
    return q, k, v, W, lr


def explicit_online_loop(q, k, v, W, lr, *, momentum=0.0, weight_decay=0.0, steps=1, sign=1.0, loss="mse"):
    """Online GD (b = 1) written token by token with torch.autograd.grad: the ablations' definition."""
    outs, m = [], torch.zeros_like(W)
    for t in range(q.shape[2]):
        k_t, v_t = k[:, :, t], v[:, :, t]
        P = W
        for _ in range(steps):
            Pr = P.clone().requires_grad_()
            pred = torch.einsum("bhd,bhde->bhe", k_t, Pr)
            L = 0.5 * (pred - v_t).pow(2).sum() if loss == "mse" else -(pred * v_t).sum()
            (g,) = torch.autograd.grad(L, Pr)
            P = P - lr[:, :, t, None, None] * g
        m = momentum * m + sign * (W - P)
        W = (1 - weight_decay) * W - m
        outs.append(torch.einsum("bhd,bhde->bhe", q[:, :, t], W))
    return torch.stack(outs, dim=2)


@pytest.mark.parametrize(
    "options",
    [{}, {"momentum": 0.7}, {"weight_decay": 0.1}, {"inner_steps": 3}, {"ascent": True},
     {"momentum": 0.5, "weight_decay": 0.05, "ascent": True}],
    ids=["plain", "momentum", "weight-decay", "3-steps", "ascent", "combined"],
)  # fmt: skip
def test_inner_loop_options_match_an_explicit_online_loop(options):
    q, k, v, W, lr = dot_inputs()
    got = ttt.ops.ttt_general(
        q, k, v, model=inner.linear_no_bias, initial_state=(W,), lr=lr, **options
    ).output
    want = explicit_online_loop(
        q, k, v, W, lr, momentum=options.get("momentum", 0.0), weight_decay=options.get("weight_decay", 0.0),
        steps=options.get("inner_steps", 1), sign=-1.0 if options.get("ascent") else 1.0,
    )  # fmt: skip
    assert max_abs_diff(got, want) < 1e-10


def test_dot_product_ascent_equals_descent_with_negated_values():
    """Liu et al.: with the dot-product loss, ascent is descent with v -> -v (exactly)."""
    q, k, v, W, lr = dot_inputs()
    a = ttt.ops.ttt_general(
        q, k, v, model=inner.linear_no_bias, initial_state=(W,), lr=lr, loss="dot", ascent=True
    )
    d = ttt.ops.ttt_general(q, k, -v, model=inner.linear_no_bias, initial_state=(W,), lr=lr, loss="dot")
    assert max_abs_diff(a.output, d.output) < 1e-12


def test_update_mask_freezes_parameters():
    x = ttt_inputs(1, 2, 8, 4, hidden=6)
    frozen = as_general(
        x, inner.mlp, mini_batch_size=2, update=(False, False, True, True), output_final_state=True
    )
    W1, b1 = frozen.final_state.weights[:2]
    assert max_abs_diff((W1[0], b1[0]), x["initial_state"][:2]) == 0
    assert max_abs_diff(frozen.final_state.weights[2][0], x["initial_state"][2]) > 1e-3


@pytest.mark.parametrize("options", [{}, {"momentum": 0.6}], ids=["plain", "momentum"])
def test_general_split_with_state_equals_whole(options):
    q, k, v, W, lr = dot_inputs(T=11)
    kw = dict(model=inner.linear_no_bias, mini_batch_size=3, output_final_state=True, **options)
    whole = ttt.ops.ttt_general(q, k, v, initial_state=(W,), lr=lr, **kw)
    for split in (1, 3, 5, 9):
        a = ttt.ops.ttt_general(q[:, :, :split], k[:, :, :split], v[:, :, :split], initial_state=(W,),
                                lr=lr[:, :, :split], **kw)  # fmt: skip
        b = ttt.ops.ttt_general(q[:, :, split:], k[:, :, split:], v[:, :, split:], initial_state=a.final_state,
                                lr=lr[:, :, split:], **kw)  # fmt: skip
        assert max_abs_diff(torch.cat([a.output, b.output], 2), whole.output) < 1e-10


def test_general_rejects_bad_options():
    q, k, v, W, lr = dot_inputs()
    with pytest.raises(ValueError, match="loss must be one of"):
        ttt.ops.ttt_general(q, k, v, model=inner.linear_no_bias, initial_state=(W,), loss="hinge")
    with pytest.raises(ValueError, match="inner_steps must be a positive int"):
        ttt.ops.ttt_general(q, k, v, model=inner.linear_no_bias, initial_state=(W,), inner_steps=0)
    with pytest.raises(ValueError, match=r"initial_state\[0\] must have shape \[B or 1, H=2, ...\]"):
        ttt.ops.ttt_general(q, k, v, model=inner.linear_no_bias, initial_state=(W[0],))
    with pytest.raises(ValueError, match="update must hold one bool per fast-weight tensor"):
        ttt.ops.ttt_general(q, k, v, model=inner.linear_no_bias, initial_state=(W,), update=(True, False))


def test_frozen_parameters_stay_frozen_during_every_inner_step():
    """Last-layer-only TTT with 3 steps == 3 steps of GD on W2 alone, with W1 fixed (2-layer, no bias)."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 1, 5, 4, generator=g, dtype=torch.float64) for _ in range(3))
    W1, W2 = (torch.randn(1, 1, 4, 4, generator=g, dtype=torch.float64) * 0.5 for _ in range(2))

    def two_layer(params, x):
        A, B = params
        return torch.tanh(x @ A) @ B

    got = ttt.ops.ttt_general(q, k, v, model=two_layer, initial_state=(W1, W2), lr=0.3, inner_steps=3,
                              update=(False, True)).output  # fmt: skip
    phi = lambda x: torch.tanh(x @ W1[0, 0])  # noqa: E731
    want = ttt.ops.ttt_general(phi(q), phi(k), v, model=inner.linear_no_bias, initial_state=(W2,), lr=0.3,
                               inner_steps=3).output  # fmt: skip
    assert max_abs_diff(got, want) < 1e-12


def test_weight_norm_keeps_the_initial_column_norms():
    q, k, v, W, lr = dot_inputs(T=7)
    out = ttt.ops.ttt_general(q, k, v, model=inner.linear_no_bias, initial_state=(W,), lr=lr, mini_batch_size=2,
                              weight_norm=True, output_final_state=True)  # fmt: skip
    W_final = out.final_state.weights[0]
    assert max_abs_diff(W_final.norm(dim=-2), W.norm(dim=-2)) < 1e-12
    assert max_abs_diff(W_final, W) > 1e-2
    # the first token's output, by hand: one GD step, then the columns rescaled
    W1 = W - lr[:, :, 0, None, None] * k[:, :, 0, :, None] * (k[:, :, 0, None, :] @ W - v[:, :, 0, None, :])
    W1 = W1 * W.norm(dim=-2, keepdim=True) / W1.norm(dim=-2, keepdim=True)
    assert max_abs_diff(out.output[:, :, 0], (q[:, :, 0, None, :] @ W1)[:, :, 0]) < 1e-12
