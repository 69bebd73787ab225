"""Bad input gets a clear error that names what was expected; NaN/Inf can always be detected."""

import pytest
import torch

import ttt
from ttt.ops import ttt_general
from ttt.testing import ttt_inputs


def call(**changes):
    x = ttt_inputs(2, 3, 10, 4)
    x.update(changes)
    kw = {k: x.pop(k) for k in list(x) if k not in ("q", "k", "v", "lr", "ln_weight", "ln_bias")}
    return ttt.ops.ttt_linear(x["q"], x["k"], x["v"], x["lr"], x["ln_weight"], x["ln_bias"], **kw)


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"q": torch.randn(2, 3, 10)}, r"q must have shape \[B, H, T, D\]"),
        ({"k": torch.randn(2, 3, 9, 4, dtype=torch.float64)}, "q and k must have the same shape"),
        ({"v": torch.randn(2, 3, 10, 5, dtype=torch.float64)}, "v must have the head dim of q"),
        ({"q": torch.randn(2, 3, 10, 4, dtype=torch.float32)}, "q, k, v must share a dtype"),
        ({"q": torch.ones(2, 3, 10, 4, dtype=torch.int64)}, "q must be float16/bfloat16/float32/float64"),
        ({"lr": torch.rand(2, 3, 9, dtype=torch.float64)}, r"lr must have shape \[B, H, T\] = \[2, 3, 10\]"),
        ({"ln_weight": torch.ones(2, 4, dtype=torch.float64)}, r"ln_weight must have shape \[H, D\] = \[3, 4\]"),
        ({"mini_batch_size": 0}, "mini_batch_size must be a positive int"),
        ({"mini_batch_size": 2.5}, "mini_batch_size must be a positive int"),
        ({"token_eta": torch.ones(3, dtype=torch.float64)}, r"token_eta must have shape \[mini_batch_size\] = \[16\]"),
        ({"initial_state": (torch.zeros(3, 4, 5, dtype=torch.float64), torch.zeros(3, 4, dtype=torch.float64))},
         r"initial_state W must have shape \[3, 4, 4\]"),
        ({"initial_state": (torch.zeros(5, 3, 4, 4, dtype=torch.float64), torch.zeros(3, 4, dtype=torch.float64))},
         r"with B in \(1, 2\)"),
        ({"initial_state": (torch.zeros(3, 4, 4, dtype=torch.float64),)}, r"must hold 2 tensors \('W', 'b'\)"),
        ({"initial_state": torch.zeros(3, 4, 4)}, "initial_state must be a tuple"),
        ({"impl": "fast"}, "impl must be one of"),
        ({"impl": "triton"}, "needs CUDA tensors"),
    ],
)  # fmt: skip
def test_bad_input_raises_a_clear_error(changes, match, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # a CPU machine without the interpreter
    with pytest.raises((ValueError, TypeError), match=match):
        call(**changes)


def test_state_from_another_configuration_is_rejected():
    x = ttt_inputs(2, 3, 10, 4)
    st = call(output_final_state=True).final_state
    with pytest.raises(ValueError, match="mini_batch_size=16, this call uses mini_batch_size=8"):
        call(initial_state=st, mini_batch_size=8)
    mlp_state = ttt.ops.ttt_mlp(
        x["q"], x["k"], x["v"], x["lr"], x["ln_weight"], x["ln_bias"], output_final_state=True,
        initial_state=ttt_inputs(2, 3, 10, 4, hidden=8)["initial_state"],
    ).final_state  # fmt: skip
    with pytest.raises(ValueError, match="produced by 'ttt_mlp', expected a 'ttt_linear' state"):
        call(initial_state=mlp_state)


def test_noncausal_cannot_resume_inside_a_mini_batch():
    st = call(mini_batch_size=4, output_final_state=True).final_state  # T = 10 -> offset 2
    with pytest.raises(ValueError, match="causal=False .* cannot resume inside a mini-batch"):
        call(mini_batch_size=4, causal=False, initial_state=st)


def test_recurrent_form_is_causal_only():
    with pytest.raises(
        ValueError, match="impl='recurrent' cannot run this ttt_linear call: it is causal only"
    ):
        call(causal=False, impl="recurrent")


def test_mlp_has_no_primal_form():
    x = ttt_inputs(1, 1, 4, 4, hidden=8)
    with pytest.raises(
        ValueError,
        match="impl must be one of 'triton', 'chunk', 'reference' or 'auto' for ttt_mlp, got 'recurrent'",
    ):
        ttt.ops.ttt_mlp(x["q"], x["k"], x["v"], x["lr"], x["ln_weight"], x["ln_bias"],
                        initial_state=x["initial_state"], impl="recurrent")  # fmt: skip


def test_nan_input_is_detectable():
    x = ttt_inputs(2, 3, 10, 4)
    k = x["k"].clone()
    k[1, 0, 3, 2] = float("nan")
    st = call(k=k, output_final_state=True).final_state
    assert st.isfinite().tolist() == [True, False]
    with pytest.raises(FloatingPointError, match="k contains NaN or Inf"):
        call(k=k, check_finite=True)
    with pytest.raises(FloatingPointError, match=r"initial_state.grad_sum.W contains NaN"):
        call(initial_state=st, check_finite=True)


def test_auto_picks_triton_only_where_it_applies(monkeypatch):
    """impl="auto": the Triton kernels on CUDA for fp32/bf16/fp16 heads up to 128 with Triton installed;
    the chunked form for float64, wider heads, operators without kernels, CPU, or no Triton. At a decode
    step the decode forms come first (Triton on CUDA, else TTT-Linear's recurrent form)."""
    import importlib.util
    from types import SimpleNamespace

    from ttt.ops import forms

    def cuda(dtype=torch.float32, D=64):
        return SimpleNamespace(device=torch.device("cuda"), dtype=dtype, shape=(2, 4, 9, D))

    auto = lambda q, op="ttt_linear", **kw: forms.resolve(op, "auto", q, **kw).name  # noqa: E731
    if importlib.util.find_spec("triton") is not None:
        assert auto(cuda()) == auto(cuda(torch.bfloat16, 128)) == auto(cuda(), decode=True) == "triton"
        assert auto(cuda(), "ttt_mlp") == "triton"
    assert auto(cuda(torch.float64)) == auto(cuda(D=256)) == auto(torch.zeros(1, 1, 2, 8)) == "chunk"
    assert auto(cuda(), "ttt_attention") == auto(cuda(), "gated_deltanet") == "chunk"
    assert auto(torch.zeros(1, 1, 1, 8), decode=True) == "recurrent"
    assert auto(torch.zeros(1, 1, 1, 8), "ttt_mlp", decode=True) == "chunk"
    assert auto(torch.zeros(1, 1, 1, 8), "gated_deltanet", decode=True) == "recurrent"
    monkeypatch.setattr(forms, "_installed", lambda module: False)
    assert auto(cuda()) == "chunk"
    with pytest.raises(ImportError, match="impl='triton' cannot run this ttt_linear call: it needs triton"):
        forms.resolve("ttt_linear", "triton", cuda())


# --- one behaviour for every op: the learning rate, eps, T = 0, overflow ---------------------------


def _ops(T: int, b: int):
    """``name -> call(lr=..., eps=...)`` for every op that takes an inner learning rate, at mini-batch b,
    each returning ``(o, state or None, initial state or None)``."""
    from ttt.ops.general import inner
    from ttt.ops.kv_binding import (
        kv_binding_parallel,
        lact_online,
        lact_recurrent,
        reduce_kv_binding,
        swiglu_features,
    )

    x = ttt_inputs(2, 3, T, 4)
    mlp = ttt_inputs(2, 3, T, 4, hidden=8)["initial_state"]
    g = torch.Generator().manual_seed(1)
    W0, W1, W2 = (torch.randn(3, *s, generator=g, dtype=torch.float64) for s in ((4, 8), (8, 4), (4, 8)))
    q, k, v = x["q"], x["k"], x["v"]
    ln = (x["ln_weight"], x["ln_bias"])

    def ttt_op(op, state, impl):
        def call(lr=x["lr"], eps=1e-6):
            o, st = op(q, k, v, lr, *ln, initial_state=state, mini_batch_size=b, impl=impl, eps=eps,
                       output_final_state=True)  # fmt: skip
            return o, st.weights, state

        return call

    def general(lr=0.1, eps=1e-6):
        S0 = tuple(t[None] for t in x["initial_state"])
        model = inner.linear
        read = inner.ln_residual_readout(model, eps)
        o, st = ttt_general(q, k, v, model=model, initial_state=S0, loss=inner.ln_residual_mse(eps), readout=read,
                            head_args=ln, lr=lr, mini_batch_size=b, output_final_state=True)  # fmt: skip
        return o, st.weights, S0

    def attention(lr=0.1, eps=None, causal=True, impl="chunk"):
        S0 = torch.zeros(1, 3, 4, 4, dtype=torch.float64)
        o, st = ttt.attention(q, k, v, lr=lr, is_causal=causal, mini_batch_size=b if causal else max(b, 2),
                              initial_state=S0, impl=impl, output_final_state=True)  # fmt: skip
        return o, st.weights, (S0,)

    def kv(lr=1.0, eps=None, **kw):
        eff = reduce_kv_binding(q, k, v, features=swiglu_features(W0, W2), lr=lr)
        Wz = torch.zeros(1, 3, 8, 4, dtype=torch.float64)
        o, (W, V) = kv_binding_parallel(eff, Wz, mini_batch_size=b, output_final_state=True, **kw)
        return o, (W,), (Wz,)

    def lact(lr=1.0, eps=None, shifted=None):
        return lact_recurrent(q, k, v, (W0, W1, W2), lr=lr, shifted_chunk_size=shifted), None, None

    cases = {
        f"ttt_linear/{i}": ttt_op(ttt.ops.ttt_linear, x["initial_state"], i) for i in ("reference", "chunk")
    }
    cases["ttt_linear/recurrent"] = ttt_op(ttt.ops.ttt_linear, x["initial_state"], "recurrent")
    cases.update({f"ttt_mlp/{i}": ttt_op(ttt.ops.ttt_mlp, mlp, i) for i in ("reference", "chunk")})
    cases.update({"ttt_general": general, "attention/chunk": attention, "kv_binding": kv, "lact": lact})
    cases["lact_online"] = lambda lr=1.0, eps=None: (lact_online(q, k, v, (W0, W1, W2), lr=lr), None, None)
    cases["attention/reference"] = lambda **kw: attention(impl="reference", **kw)
    cases["attention/non-causal"] = lambda **kw: attention(causal=False, **kw)
    cases["kv_binding/momentum"] = lambda **kw: kv(**kw) if b > 1 else kv(lr=kw.get("lr", 1.0))
    cases["lact/shifted"] = lambda **kw: lact(shifted=4, **kw)
    return cases


OPS = list(_ops(3, 1))


@pytest.mark.parametrize("b", [1, 4])
@pytest.mark.parametrize("name", OPS)
def test_empty_sequence_gives_empty_output_and_unchanged_state(name, b):
    """T = 0: every op, every form returns ``o [B, H, 0, Dv]`` and its initial state (13 crashed)."""
    o, weights, initial = _ops(0, b)[name]()
    assert o.shape == (2, 3, 0, 4)
    if weights is not None:
        for w, w0 in zip(weights, initial):
            torch.testing.assert_close(w, w0.expand_as(w).to(w.dtype))


@pytest.mark.parametrize("b", [1, 4, 16])
@pytest.mark.parametrize("name", OPS)
def test_negative_or_non_finite_lr_is_refused_alike(name, b):
    """lr >= 0 and finite in every op at every mini-batch size (gradient ascent is ``ascent=True``)."""
    call = _ops(10, b)[name]
    for lr, match in [
        (-0.1, r"^lr must lie in \[0.0, inf\], got min -0.1"),
        (float("nan"), "^lr must be finite"),
    ]:
        with pytest.raises(ValueError, match=match):
            call(lr=lr)
        with pytest.raises(ValueError, match=match):
            call(lr=torch.full((2, 3, 10), lr, dtype=torch.float64))


@pytest.mark.parametrize("name", [n for n in OPS if n.startswith(("ttt_", "ttt_general"))])
@pytest.mark.parametrize("eps", [0.0, -1e-6, float("nan")])
def test_non_positive_eps_is_refused_alike(name, eps):
    with pytest.raises(ValueError, match=r"^eps must be a finite float > 0"):
        _ops(10, 4)[name](eps=eps)


def test_check_finite_catches_overflow_from_finite_inputs():
    """Finite inputs, a step so large the fast weights overflow: NaN came back silently before."""
    x = ttt_inputs(1, 2, 40, 4, dtype=torch.float32)
    lr = torch.full((1, 2, 40), 1e30)
    args = (x["q"], x["k"], x["v"], lr, x["ln_weight"], x["ln_bias"])
    out = ttt.ops.ttt_linear(*args, initial_state=x["initial_state"], mini_batch_size=4)
    assert not torch.isfinite(out.output).all()  # what an unchecked call returns
    with pytest.raises(FloatingPointError, match="output overflowed to Inf/NaN from finite inputs"):
        ttt.ops.ttt_linear(*args, initial_state=x["initial_state"], mini_batch_size=4, check_finite=True)


def test_token_eta_must_be_finite_and_non_negative():
    """token_eta scales the learning rate per position: a NaN or negative one was taken silently (NaN
    outputs; a negative step is gradient ascent, which is ``ascent=True`` where an op offers it)."""
    from ttt.ops.general import inner

    x = ttt_inputs(2, 3, 10, 4)
    S0 = tuple(t[None] for t in x["initial_state"])
    calls = {
        "ttt_linear": lambda te: call(mini_batch_size=4, token_eta=te),
        "ttt_general": lambda te: ttt_general(x["q"], x["k"], x["v"], model=inner.linear, initial_state=S0,
                                              mini_batch_size=4, token_eta=te),
        "attention": lambda te: ttt.attention(x["q"], x["k"], x["v"], is_causal=True, mini_batch_size=4,
                                              token_eta=te),
    }  # fmt: skip
    for run in calls.values():
        for bad in (float("nan"), -1.0, float("inf")):
            te = torch.ones(4, dtype=torch.float64)
            te[1] = bad
            with pytest.raises(ValueError, match=r"^token_eta must"):
                run(te)


@pytest.mark.parametrize(
    "option,value",
    [("momentum", -0.5), ("momentum", float("nan")), ("momentum", 1.0), ("weight_decay", float("nan")),
     ("weight_decay", -0.1), ("weight_decay", 1.5)],
)  # fmt: skip
def test_inner_optimiser_coefficients_are_checked(option, value):
    """momentum in [0, 1), weight decay in [0, 1]: a NaN one gave NaN outputs without a word."""
    from ttt.ops.general import inner
    from ttt.ops.kv_binding import lact_online, lact_recurrent

    x = ttt_inputs(2, 3, 10, 4)
    S0 = tuple(t[None] for t in x["initial_state"])
    with pytest.raises(ValueError, match=rf"^{option} must be a finite number in \[0, 1"):
        ttt_general(x["q"], x["k"], x["v"], model=inner.linear, initial_state=S0, **{option: value})
    if option == "momentum":
        W = tuple(torch.randn(3, *s, dtype=torch.float64) for s in ((4, 8), (8, 4), (4, 8)))
        for fn in (lact_recurrent, lact_online):
            with pytest.raises(ValueError, match=r"^momentum must be a finite number in \[0, 1\)"):
                fn(x["q"], x["k"], x["v"], W, momentum=value)


def test_gate_values_are_checked_except_while_a_cuda_graph_is_captured(monkeypatch):
    """A capture cannot read a value on the host (the read would end it with an error), so the range check
    skips itself then; shapes are still checked, and outside a capture a NaN gate is refused."""
    from ttt.ops import _checks

    bad = torch.tensor([[[0.5, float("nan")]]])
    with pytest.raises(ValueError, match="beta must be finite"):
        _checks.check_gate("beta", bad, (1, 1, 2), torch.float32, low=0.0)
    monkeypatch.setattr(_checks, "capturing", lambda x: True)
    assert _checks.check_gate("beta", bad, (1, 1, 2), torch.float32, low=0.0).shape == (1, 1, 2)
    with pytest.raises(ValueError, match="must have shape"):
        _checks.check_gate("beta", bad, (1, 1, 3), torch.float32, low=0.0)
