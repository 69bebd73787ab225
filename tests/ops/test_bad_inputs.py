"""Bad input gets a clear error that names what was expected; NaN/Inf can always be detected."""

import pytest
import torch

import ttt
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
