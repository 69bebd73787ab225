"""Bad input raises a clear error naming the expected shape / range; long sequences stay finite."""

from __future__ import annotations

import pytest
import torch
from family_cases import ALL_RULES, make_case

import ttt
import ttt.ops.family as fam
from ttt.ops._checks import gates_computed_by

B, H, T, D = 1, 2, 6, 4


def _qkv(dtype=torch.float32):
    return torch.randn(3, B, H, T, D, dtype=dtype).unbind(0)


def test_decay_out_of_range():
    q, k, v = _qkv()
    beta = torch.rand(B, H, T)
    with pytest.raises(ValueError, match=r"alpha must lie in \(0.0, 1.0\]"):
        fam.gated_deltanet(q, k, v, beta=beta, alpha=torch.full((B, H, T), 1.5))
    with pytest.raises(ValueError, match=r"alpha must lie in \(0.0"):
        fam.gated_deltanet(q, k, v, beta=beta, alpha=torch.zeros(B, H, T))
    with pytest.raises(ValueError, match=r"log_alpha must lie in \[-inf, 0.0\]"):
        fam.gated_deltanet(q, k, v, beta=beta, log_alpha=torch.full((B, H, T), 0.1))
    with pytest.raises(ValueError, match="exactly one of alpha"):
        fam.gated_deltanet(q, k, v, beta=beta)
    with pytest.raises(ValueError, match="exactly one of alpha"):
        fam.gated_deltanet(q, k, v, beta=beta, alpha=torch.ones(B, H, T), log_alpha=torch.zeros(B, H, T))
    with pytest.raises(ValueError, match="decay must lie in"):
        fam.hebbian(q, k, v, decay=1.2, lr=0.1)
    with pytest.raises(ValueError, match="alpha must be finite"):
        fam.mamba2(q, k, v, beta=torch.rand(B, H, T), alpha=torch.full((B, H, T), float("nan")))


def test_negative_learning_rate():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"beta must lie in \[0.0"):
        fam.deltanet(q, k, v, beta=-torch.rand(B, H, T))
    with pytest.raises(ValueError, match="lr must lie in"):
        fam.hebbian(q, k, v, decay=0.9, lr=-0.1)
    with pytest.raises(ValueError, match=r"beta must lie in \[0.0, 1.0\], got max 2"):
        fam.rwkv7(q, k, v, beta=torch.full((B, H, T, D), 2.0), k_hat=k, alpha=torch.ones(B, H, T, D))


def test_shape_mismatches():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"beta must have shape \[1, 2, 6\]"):
        fam.deltanet(q, k, v, beta=torch.rand(B, H, T + 1))
    with pytest.raises(ValueError, match=r"alpha must have shape \[1, 2, 6, 4\]"):
        fam.kda(q, k, v, beta=torch.rand(B, H, T), alpha=torch.rand(B, H, T))
    with pytest.raises(ValueError, match=r"q and k must have the same shape"):
        fam.deltanet(q, k[..., :3], v, beta=torch.rand(B, H, T))
    with pytest.raises(ValueError, match=r"v must be \[B, H, T, Dv\] with B, H, T of q"):
        fam.deltanet(q, k, v[:, :, :3], beta=torch.rand(B, H, T))
    with pytest.raises(ValueError, match=r"q must have shape \[B, H, T, D\] \(4 dims\)"):
        fam.linear_attention(q[0], k, v)
    with pytest.raises(ValueError, match=r"initial_state must be \[B, H, Dk, Dv\]"):
        fam.linear_attention(q, k, v, initial_state=torch.zeros(B, H, D, D + 1))
    with pytest.raises(TypeError, match="must share a dtype"):
        fam.linear_attention(q, k.double(), v)
    with pytest.raises(ValueError, match=r"alpha must have shape \[2\]"):
        fam.retnet(q, k, v, alpha=torch.tensor([0.9, 0.9, 0.9]))


def test_unknown_impl_raises():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="impl must be one of"):
        fam.linear_attention(q, k, v, impl="triton")
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        fam.linear_attention(q, k, v, chunk_size=0)


def test_reference_alias_is_the_autograd_form():
    case = make_case("comba", T=7)
    o1, S1 = case.run("reference")
    o2, S2 = case.run("autograd")
    assert torch.equal(o1, o2) and torch.equal(S1, S2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_inputs_follow_the_dtype_contract(dtype):
    """Outputs in q.dtype, state in float32; error vs float64 within the dtype's budget."""
    case = make_case("gated_deltanet", T=33, dtype=torch.float64, seed=11)
    ref_o, ref_S = case.run("chunk")
    low = {n: x.detach().to(dtype) for n, x in case.leaves.items()}
    low["initial_state"] = low["initial_state"].float()
    o, S = fam.gated_deltanet(**low, output_final_state=True)
    assert o.dtype == dtype and S.dtype == torch.float32
    eps = torch.finfo(dtype).eps
    # inputs are rounded to the dtype, so the error is of order eps * |values| * (steps remembered)
    budget = 50 * eps * ref_o.abs().max().item()
    assert (o.double() - ref_o).abs().max().item() < budget


@pytest.mark.parametrize("impl", ["chunk", "recurrent", "autograd"])
@pytest.mark.parametrize("rule", ALL_RULES)
def test_autocast_keeps_every_form_in_float32(rule, impl):
    """Under a bf16 autocast the forms run with autocast disabled: float32 inputs give exactly the float32
    results, forward and every gradient (the chunk form's triangular solve has no bf16 CPU kernel)."""
    case = make_case(rule, T=11, dtype=torch.float32, seed=3)
    want = case.run(impl, chunk_size=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = case.run(impl, chunk_size=4)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    # backward outside the autocast region, as torch.autocast asks: it then replays the forward's dtypes
    leaves = list(case.leaves.values())
    want_g = torch.autograd.grad(want[0].sum() + want[1].sum(), leaves)
    got_g = torch.autograd.grad(got[0].sum() + got[1].sum(), leaves)
    assert all(torch.equal(a, b) for a, b in zip(got_g, want_g))


@pytest.mark.parametrize("rule", ALL_RULES)
def test_bf16_inputs_compute_in_float32(rule):
    """bf16 inputs (no autocast) are accepted by every rule: o in bf16, the state in float32."""
    case = make_case(rule, T=11, dtype=torch.float32, seed=3)
    want, _ = case.run("chunk", chunk_size=4)
    low = {n: x.detach().bfloat16() for n, x in case.leaves.items()}
    op = getattr(fam, rule.replace("_per_column", ""))
    o, S = op(**low, output_final_state=True, chunk_size=4)
    assert o.dtype == torch.bfloat16 and S.dtype == torch.float32
    assert torch.isfinite(o).all()
    err = (o.float() - want).abs().max().item()
    assert err < 50 * torch.finfo(torch.bfloat16).eps * want.abs().max().item()


def test_gate_error_prints_the_offending_value_exactly():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"alpha must lie in \(0.0, 1.0\], got max 1.00003"):
        fam.mamba2(q, k, v, beta=torch.rand(B, H, T), alpha=torch.full((B, H, T), 1.00003))


def test_gate_error_names_the_layer_that_computed_the_gate():
    q, k, v = _qkv()
    beta = torch.full((B, H, T), float("nan"))
    with pytest.raises(ValueError, match=r"beta must be finite \(found NaN or Inf\)$"):
        fam.deltanet(q, k, v, beta=beta)
    with gates_computed_by("DeltaNet"):
        with pytest.raises(ValueError, match="DeltaNet computed beta from its input x"):
            fam.deltanet(q, k, v, beta=beta)


def test_ttt_attention_names_lr_at_mini_batch_1():
    """mini_batch_size=1 runs the delta rule with beta = lr: its range error names lr, not beta."""
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"^lr must lie in \[0.0, inf\], got min -1.0"):
        ttt.attention(q, k, v, lr=-1.0)
    with pytest.raises(ValueError, match="^lr must be finite"):
        ttt.attention(q, k, v, lr=torch.full((B, H, T), float("nan")))
    with pytest.raises(ValueError, match=r"^token_eta must lie in \[0.0, inf\], got min -1.0"):
        ttt.attention(q, k, v, lr=0.5, token_eta=torch.tensor([-1.0]), is_causal=True)


@pytest.mark.parametrize("rule", ["gla", "kda", "mamba2", "gated_deltanet"])
def test_long_sequence_with_strong_decay_stays_finite(rule):
    """T = 65536 with log-decays down to -20 per token: cumulative decays reach -6e5, far past
    exp underflow/overflow; the chunk form only ever exponentiates differences <= 0."""
    torch.manual_seed(0)
    B, H, T, D = 1, 1, 65536, 8
    q, k, v = torch.randn(3, B, H, T, D).unbind(0)
    k = torch.nn.functional.normalize(k, dim=-1)
    shape = (B, H, T, D) if rule in ("gla", "kda") else (B, H, T)
    log_alpha = -20 * torch.rand(shape)
    kw = {"log_alpha": log_alpha}
    if rule in ("kda", "mamba2", "gated_deltanet"):
        kw["beta"] = torch.rand(B, H, T)
    with torch.no_grad():
        o, S = getattr(fam, rule)(q, k, v, **kw, output_final_state=True)
    assert torch.isfinite(o).all() and torch.isfinite(S).all()
    # the last tokens' outputs agree with the recurrence restarted from the state 64 tokens earlier
    with torch.no_grad():
        _, S_mid = getattr(fam, rule)(
            q[:, :, :-64],
            k[:, :, :-64],
            v[:, :, :-64],
            **{n: x[:, :, :-64] for n, x in kw.items()},
            output_final_state=True,
        )
        o_tail, _ = getattr(fam, rule)(
            q[:, :, -64:],
            k[:, :, -64:],
            v[:, :, -64:],
            **{n: x[:, :, -64:] for n, x in kw.items()},
            initial_state=S_mid,
            impl="recurrent",
        )
    assert (o_tail - o[:, :, -64:]).abs().max().item() < 1e-4


@pytest.mark.parametrize("impl", ["chunk", "recurrent", "autograd"])
@pytest.mark.parametrize("rule", ALL_RULES)
def test_empty_sequence_gives_empty_output_and_unchanged_state(rule, impl):
    """T = 0, as in every op: ``o [B, H, 0, Dv]`` and the initial state back (every rule crashed)."""
    case = make_case(rule, T=0)
    o, S = case.run(impl)
    assert o.shape == (2, 2, 0, 4)
    torch.testing.assert_close(S, case.leaves["initial_state"])
