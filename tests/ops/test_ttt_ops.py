"""TTT-Linear and TTT-MLP: every execution form against the autograd reference, in float64.

Each test runs for both operators (``variant``): the math is the same up to the inner model.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ttt
from ttt.ops.common import grad_of_inner_loss, layer_norm, ln_l2_grad, per_head
from ttt.testing import grad_leaves, max_abs_diff, ttt_inputs

OPS = {"linear": ttt.ops.ttt_linear, "mlp": ttt.ops.ttt_mlp}
HIDDEN = {"linear": None, "mlp": 12}
FAST_FORMS = {"linear": ["chunk", "recurrent"], "mlp": ["chunk"]}


def run(variant, inputs, **kw):
    x = dict(inputs)
    return OPS[variant](
        x.pop("q"), x.pop("k"), x.pop("v"), x.pop("lr"), x.pop("ln_weight"), x.pop("ln_bias"), **x, **kw
    )


@pytest.mark.parametrize("variant", ["linear", "mlp"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize(
    "B,H,T,D,b",
    [(2, 3, 37, 8, 5), (1, 2, 3, 7, 16), (2, 1, 32, 5, 16), (1, 2, 1, 4, 4), (3, 2, 20, 6, 1)],
    ids=["T-not-multiple", "T-lt-b", "D-odd", "T1", "b1"],
)
def test_fast_forms_match_reference(variant, causal, B, H, T, D, b):
    x = ttt_inputs(B, H, T, D, hidden=HIDDEN[variant])
    ref = run(variant, x, mini_batch_size=b, causal=causal, impl="reference", output_final_state=True)
    for impl in FAST_FORMS[variant]:
        if impl == "recurrent" and not causal:
            continue
        out = run(variant, x, mini_batch_size=b, causal=causal, impl=impl, output_final_state=True)
        assert max_abs_diff(out.output, ref.output) < 1e-10
        assert max_abs_diff(out.final_state.weights, ref.final_state.weights) < 1e-10
        assert max_abs_diff(out.final_state.anchor, ref.final_state.anchor) < 1e-10
        assert out.final_state.offset == ref.final_state.offset == T % b


@pytest.mark.parametrize("variant", ["linear", "mlp"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_gradients_match_reference(variant, causal):
    """Outer gradients w.r.t. q, k, v, lr, LN params, W0 (and token_eta) through every form."""
    x = ttt_inputs(1, 2, 11, 5, hidden=HIDDEN[variant] and 6, requires_grad=True)
    token_eta = (1.0 / torch.arange(1, 5, dtype=torch.float64)).requires_grad_()
    leaves = grad_leaves(x) + [token_eta]

    def grads(impl):
        out = run(
            variant,
            x,
            mini_batch_size=4,
            causal=causal,
            impl=impl,
            token_eta=token_eta,
            output_final_state=True,
        )
        w = torch.linspace(-1, 1, out.output.numel(), dtype=torch.float64).reshape(out.output.shape)
        objective = (out.output * w).sum() + sum((t**2).sum() for t in out.final_state.weights)
        return torch.autograd.grad(objective, leaves)

    ref = grads("reference")
    for impl in FAST_FORMS[variant]:
        if impl == "recurrent" and not causal:
            continue
        got = grads(impl)
        for r, g in zip(ref, got):
            assert max_abs_diff(g, r) < 1e-10


@pytest.mark.parametrize("variant", ["linear", "mlp"])
def test_chunk_gradcheck(variant):
    x = ttt_inputs(1, 1, 7, 3, hidden=HIDDEN[variant] and 4, requires_grad=True)
    leaves = grad_leaves(x)

    def f(*flat):
        it = iter(flat)
        rebuilt = {k: tuple(next(it) for _ in v) if isinstance(v, tuple) else next(it) for k, v in x.items()}
        return run(variant, rebuilt, mini_batch_size=3, impl="chunk").output

    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-7)


def test_closed_form_inner_gradient_matches_autograd():
    """The hand-derived LN + L2 gradient of the dual form == torch.func.grad of the loss."""
    g = torch.Generator().manual_seed(1)
    H, D = 3, 7
    z, target = (
        torch.randn(2, H, 5, D, generator=g, dtype=torch.float64),
        torch.randn(2, H, 5, D, generator=g, dtype=torch.float64),
    )
    w, b = (
        torch.randn(H, D, generator=g, dtype=torch.float64),
        torch.randn(H, D, generator=g, dtype=torch.float64),
    )

    def loss(z_):
        return 0.5 * (layer_norm(z_, w, b, 1e-6) - target).pow(2).sum()

    want = torch.func.grad(loss)(z)
    assert max_abs_diff(ln_l2_grad(z, target, w, b, 1e-6), want) < 1e-12
    # the fused form used by the chunked paths (ATen's LayerNorm forward/backward)
    fused = grad_of_inner_loss(z, (target - per_head(b)) * per_head(w), per_head(w * w), 1e-6)
    assert max_abs_diff(fused, want) < 1e-12


@pytest.mark.parametrize(
    "variant,impl", [(v, i) for v in ("linear", "mlp") for i in ["reference", *FAST_FORMS[v]]]
)
def test_split_at_every_point_equals_whole(variant, impl):
    T, b = 11, 4
    x = ttt_inputs(2, 2, T, 4, hidden=HIDDEN[variant] and 5)
    whole = run(variant, x, mini_batch_size=b, impl=impl, output_final_state=True)
    for split in range(T + 1):
        first = {**x, **{n: x[n][:, :, :split] for n in ("q", "k", "v", "lr")}}
        second = {**x, **{n: x[n][:, :, split:] for n in ("q", "k", "v", "lr")}}
        a = run(variant, first, mini_batch_size=b, impl=impl, output_final_state=True)
        second["initial_state"] = a.final_state
        c = run(variant, second, mini_batch_size=b, impl=impl, output_final_state=True)
        assert max_abs_diff(torch.cat([a.output, c.output], dim=2), whole.output) < 1e-10, split
        assert max_abs_diff(c.final_state.weights, whole.final_state.weights) < 1e-10, split


@pytest.mark.parametrize("variant", ["linear", "mlp"])
def test_prefill_then_token_by_token_decode_equals_whole(variant):
    T, prefill, b = 19, 6, 4
    x = ttt_inputs(2, 2, T, 4, hidden=HIDDEN[variant] and 5)
    whole = run(variant, x, mini_batch_size=b, output_final_state=True)
    pre = {**x, **{n: x[n][:, :, :prefill] for n in ("q", "k", "v", "lr")}}
    out = run(variant, pre, mini_batch_size=b, output_final_state=True)
    outs, state = [out.output], out.final_state
    decode = "recurrent" if variant == "linear" else "chunk"
    for t in range(prefill, T):
        step = {**x, **{n: x[n][:, :, t : t + 1] for n in ("q", "k", "v", "lr")}, "initial_state": state}
        out = run(variant, step, mini_batch_size=b, impl=decode, output_final_state=True)
        outs.append(out.output)
        state = out.final_state
    assert max_abs_diff(torch.cat(outs, dim=2), whole.output) < 1e-10
    assert max_abs_diff(state.weights, whole.final_state.weights) < 1e-10


def test_mini_batch_one_is_online_gradient_descent():
    """b = 1: W_t = W_{t-1} - lr_t * grad loss_t(W_{t-1}), gradient written out by autograd here."""
    x = ttt_inputs(1, 2, 9, 4)
    lw, lb = x["ln_weight"], x["ln_bias"]
    W, b = (t[None].clone() for t in x["initial_state"])
    outs = []
    for t in range(9):
        k_t, v_t, q_t = (x[n][:, :, t : t + 1] for n in ("k", "v", "q"))
        Wr, br = W.clone().requires_grad_(), b.clone().requires_grad_()
        loss = 0.5 * (layer_norm(k_t @ Wr + br[:, :, None], lw, lb, 1e-6) - (v_t - k_t)).pow(2).sum()
        gW, gb = torch.autograd.grad(loss, (Wr, br))
        eta = x["lr"][:, :, t]
        W, b = W - eta[..., None, None] * gW, b - eta[..., None] * gb
        outs.append(q_t + layer_norm(q_t @ W + b[:, :, None], lw, lb, 1e-6))
    got = run("linear", x, mini_batch_size=1).output
    assert max_abs_diff(got, torch.cat(outs, dim=2)) < 1e-10


@pytest.mark.parametrize("variant", ["linear", "mlp"])
def test_zero_lr_is_the_static_initial_model(variant):
    x = ttt_inputs(2, 2, 13, 4, hidden=HIDDEN[variant] and 6)
    x["lr"] = torch.zeros_like(x["lr"])
    out = run(variant, x, mini_batch_size=4, output_final_state=True)
    q, lw, lb = x["q"], x["ln_weight"], x["ln_bias"]
    if variant == "linear":
        W, b = x["initial_state"]
        z = q @ W + b[:, None]
    else:
        W1, b1, W2, b2 = x["initial_state"]
        z = torch.nn.functional.gelu(q @ W1 + b1[:, None], approximate="tanh") @ W2 + b2[:, None]
    assert max_abs_diff(out.output, q + layer_norm(z, lw, lb, 1e-6)) < 1e-12
    assert (
        max_abs_diff(out.final_state.weights, tuple(t.expand(2, *t.shape) for t in x["initial_state"])) == 0
    )


@pytest.mark.parametrize("variant", ["linear", "mlp"])
def test_batch_invariance_and_state_broadcast(variant):
    x = ttt_inputs(3, 2, 10, 4, hidden=HIDDEN[variant] and 5)
    full = run(variant, x, mini_batch_size=4).output
    for i in range(3):
        one = {**x, **{n: x[n][i : i + 1] for n in ("q", "k", "v", "lr")}}
        one["initial_state"] = tuple(t[None] for t in x["initial_state"])  # leading batch of 1
        assert max_abs_diff(run(variant, one, mini_batch_size=4).output, full[i : i + 1]) < 1e-12
    per_batch = {**x, "initial_state": tuple(t.expand(3, *t.shape) for t in x["initial_state"])}
    assert max_abs_diff(run(variant, per_batch, mini_batch_size=4).output, full) == 0


@pytest.mark.parametrize("variant", ["linear", "mlp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_inputs_keep_fp32_state(variant, dtype):
    x64 = ttt_inputs(1, 2, 21, 8, hidden=HIDDEN[variant] and 16)
    ref = run(variant, x64, mini_batch_size=4).output
    x = {k: tuple(t.to(dtype) for t in v) if isinstance(v, tuple) else v.to(dtype) for k, v in x64.items()}
    out = run(variant, x, mini_batch_size=4, output_final_state=True)
    assert out.output.dtype == dtype
    assert all(t.dtype == torch.float32 for t in out.final_state.weights)
    # inputs were rounded to `dtype`; the computation itself is fp32, so the error is input rounding
    tol = {torch.float32: 1e-4, torch.bfloat16: 0.25, torch.float16: 0.05}[dtype]
    assert max_abs_diff(out.output, ref) < tol


def test_empty_sequence_returns_the_initial_state():
    x = ttt_inputs(2, 2, 0, 4)
    out = run("linear", x, mini_batch_size=4, output_final_state=True)
    assert out.output.shape == (2, 2, 0, 4)
    assert out.final_state.offset == 0
    assert (
        max_abs_diff(out.final_state.weights, tuple(t.expand(2, *t.shape) for t in x["initial_state"])) == 0
    )


@settings(max_examples=15, deadline=None)
@given(
    B=st.integers(1, 2), H=st.integers(1, 2), T=st.integers(0, 20), D=st.integers(3, 8), b=st.integers(1, 8),
    causal=st.booleans(), seed=st.integers(0, 1000),
)  # fmt: skip
def test_property_chunk_equals_reference(B, H, T, D, b, causal, seed):
    # D >= 3: a 2-dim LayerNorm maps every vector to (+-1, -+1) and its Jacobian amplifies rounding by up to
    # 1/sqrt(eps), so two exact forms differ by more than 1e-10 there for reasons of conditioning alone
    x = ttt_inputs(B, H, T, D, seed=seed)
    ref = run("linear", x, mini_batch_size=b, causal=causal, impl="reference", output_final_state=True)
    out = run("linear", x, mini_batch_size=b, causal=causal, output_final_state=True)
    assert max_abs_diff(out.output, ref.output) < 1e-10
    assert max_abs_diff(out.final_state.weights, ref.final_state.weights) < 1e-10


@pytest.mark.parametrize("variant", ["linear", "mlp"])
def test_autocast_keeps_the_inner_loop_in_fp32(variant):
    x = ttt_inputs(1, 2, 21, 8, hidden=HIDDEN[variant] and 16, dtype=torch.float32, requires_grad=True)
    ref = run(variant, x, mini_batch_size=4).output
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run(variant, x, mini_batch_size=4).output
    out.sum().backward()
    assert out.dtype == torch.float32 and max_abs_diff(out, ref) == 0
    assert all(t.grad is not None for t in grad_leaves(x))
