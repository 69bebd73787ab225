"""The family rules on fla-core's Triton chunk kernels (``ttt.ops.family.fla_backend``).

On CUDA (``gpu``): fla's kernel output, final state and every gradient equal our chunk form in float32
(tolerance: Triton's float32 dots run in tf32 on Ampere and later, about 1e-3 relative).
On CPU: fla's kernels do not run under the Triton interpreter (their autotuner asks for a GPU driver,
and with the autotuning pruned the interpreter fails inside the kernels), so the adapters
(layout, scale, keyword names, gate conventions) are checked with fla's pure-PyTorch references
standing in for the kernels.
"""

from __future__ import annotations

import pytest
import torch
from family_cases import make_case

import ttt.ops.family.additive as additive_ops
import ttt.ops.family.delta as delta_ops
import ttt.ops.family.fla_backend as fb
from ttt.ops._checks import check_state, resolve_scale
from ttt.ops.common import compute_dtype

FLA_RULES = sorted(fb.FLA_KERNELS)


def _fla_run_rule(name, q, v, tokens, scale, initial_state, output_final_state, impl, chunk_size):
    """What the dispatch does for an fla form: our dtype and scale handling, then ``fla_form(name)``."""
    del impl
    dtype, out_dtype = compute_dtype(q.dtype), q.dtype
    B, H, T, Dk = q.shape
    S0 = check_state(initial_state, B, H, Dk, v.shape[-1], dtype, q)
    q = q.to(dtype) * resolve_scale(scale, Dk)
    tokens = {n: x.to(dtype) for n, x in tokens.items()}
    o, S = fb.fla_form(name)(q, tokens, S0, chunk_size)
    return o.to(out_dtype), (S if output_final_state else None)


def _run(case, monkeypatch, fla: bool):
    """Forward and the gradients of a fixed random functional of (o, S) w.r.t. every leaf."""
    if fla:
        monkeypatch.setattr(additive_ops, "run_rule", _fla_run_rule)
        monkeypatch.setattr(delta_ops, "run_rule", _fla_run_rule)
    o, S = case.run("chunk", 16)
    monkeypatch.undo()
    g = torch.Generator().manual_seed(1)
    do = torch.randn(o.shape, generator=g).to(o)
    dS = torch.randn(S.shape, generator=g).to(S)
    loss = (o.float() * do).sum() + (S.float() * dS).sum()
    names = list(case.leaves)
    grads = torch.autograd.grad(loss, [case.leaves[n] for n in names])
    return {"o": o.detach(), "S": S.detach(), **{f"d{n}": gr for n, gr in zip(names, grads)}}


def _case(rule, device, T, D, seed=0):
    case = make_case(rule, B=2, H=2, T=T, Dk=D, Dv=D, dtype=torch.float32, seed=seed)
    for name, x in list(case.leaves.items()):
        case.leaves[name] = x.detach().to(device).requires_grad_(True)
    return case


def _compare(ours, theirs, rule, rel):
    for name in ours:
        a, b = ours[name].double(), theirs[name].double()
        err = (a - b).abs().max().item()
        budget = rel * max(1.0, a.abs().max().item())
        print(f"fla backend {rule} {name}: max abs err {err:.2e} (max |x| {a.abs().max().item():.2f})")
        assert err <= budget, f"{rule} {name}: fla differs from our chunk form by {err:.3g} > {budget:.3g}"


def test_fla_form_covers_the_rules_fla_implements():
    assert fb.fla_form("longhorn") is None
    assert fb.fla_form("no_such_rule") is None
    for rule in FLA_RULES:
        assert callable(fb.fla_form(rule)), rule


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fla_form_refuses_what_fla_cannot_run(dtype):
    q = torch.zeros(1, 1, 4, 8, dtype=dtype)
    tokens = {"k": q, "v": q, "beta": q[..., 0], "log_alpha": q[..., 0]}
    want = "runs on CUDA tensors of float32 / bfloat16 / float16"
    with pytest.raises(ValueError, match=want):
        fb.fla_form("gated_deltanet")(q, tokens, torch.zeros(1, 1, 8, 8, dtype=dtype), 64)


@pytest.mark.gpu
@pytest.mark.parametrize("rule", FLA_RULES)
def test_fla_kernel_equals_our_chunk_form(rule, monkeypatch):
    pytest.importorskip("fla")
    case = _case(rule, "cuda", T=100, D=32)  # T not a multiple of fla's chunk
    ours = _run(case, monkeypatch, fla=False)
    theirs = _run(case, monkeypatch, fla=True)
    _compare(ours, theirs, rule, rel=1e-2)


# --- CPU: the adapters, with fla's pure-PyTorch references in place of its kernels --------------------


def _references():
    """fla kernel name -> a pure-PyTorch stand-in taking the kernel's keyword arguments."""
    from test_fla_oracle import _naive  # noqa: PLC0415 -- skips this test without fla / einops

    la, sg, gla = _naive("linear_attn"), _naive("simple_gla"), _naive("gla")
    gdr, kda, comba = _naive("gated_delta_rule"), _naive("kda"), _naive("comba")
    dplr = _naive("generalized_delta_rule/dplr")
    bhtd = lambda x: x.transpose(1, 2)  # noqa: E731 -- the dplr reference is [B, H, T, D]

    def fixed_scale(q, scale):  # references that hard-code K^-1/2
        return q * scale / q.shape[-1] ** -0.5

    def rwkv7(r, w, k, v, a, b, scale, initial_state, output_final_state):
        args = (bhtd(x) for x in (fixed_scale(r, scale), k, v, a, b, w))
        o, S = dplr.dplr_recurrence(*args, initial_state=initial_state, output_final_state=True)
        return bhtd(o), S

    return {
        "chunk_linear_attn": la.naive_recurrent_linear_attn,
        "chunk_simple_gla": sg.naive_recurrent_simple_gla,
        "chunk_gla": lambda q, k, v, g, scale, **kw: gla.naive_recurrent_gla(
            fixed_scale(q, scale), k, v, g, **kw
        ),
        "chunk_gated_delta_rule": gdr.naive_recurrent_gated_delta_rule,
        "chunk_kda": kda.naive_recurrent_kda,
        # fla's chunk reference: the Comba paper's form, as its chunk kernel (see test_fla_oracle)
        "chunk_comba": lambda **kw: comba.naive_chunk_comba(**kw, chunk_size=16),
        "chunk_rwkv7": rwkv7,
    }


@pytest.mark.parametrize("rule", FLA_RULES)
def test_adapters_with_fla_references_on_cpu(rule, monkeypatch):
    refs = _references()
    case = _case(rule, "cpu", T=64, D=8)  # the chunk references need T a multiple of their chunk
    ours = _run(case, monkeypatch, fla=False)
    monkeypatch.setattr(fb, "_kernel", lambda r, q: refs[fb.FLA_KERNELS[r].split(":")[1]])
    theirs = _run(case, monkeypatch, fla=True)
    _compare(ours, theirs, rule, rel=1e-4)
