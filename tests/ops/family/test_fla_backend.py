"""The family rules on fla-core's Triton chunk kernels (``ttt.ops.family.fla_backend``), through the
public ops with ``impl="fla"`` (the family dispatch's own path), against ``impl="chunk"``.

On CUDA (``gpu``): fla's kernel output, final state and every gradient equal our chunk form in float32
(tolerance: Triton's float32 dots run in tf32 on Ampere and later, about 1e-3 relative).
On CPU under ``TRITON_INTERPRET=1`` (tests/conftest.py sets it without CUDA): the same comparison with
fla's kernels run by the Triton interpreter (``ttt/ops/family/fla_interpreter.py`` closes the three gaps
that stopped them), in IEEE float32, at the smallest shapes fla's dots take (16-wide heads).
On CPU with fla's pure-PyTorch references standing in for the kernels: the adapters once more, against
a second implementation of fla's conventions.
"""

from __future__ import annotations

import os

import pytest
import torch
from family_cases import make_case

import ttt.ops.family.fla_backend as fb

FLA_RULES = sorted(fb.FLA_KERNELS)


def _run(case, impl: str):
    """Forward and the gradients of a fixed random functional of (o, S) w.r.t. every leaf."""
    o, S = case.run(impl, 16)
    g = torch.Generator().manual_seed(1)
    do = torch.randn(o.shape, generator=g).to(o)
    dS = torch.randn(S.shape, generator=g).to(S)
    loss = (o.float() * do).sum() + (S.float() * dS).sum()
    names = list(case.leaves)
    grads = torch.autograd.grad(loss, [case.leaves[n] for n in names])
    return {"o": o.detach(), "S": S.detach(), **{f"d{n}": gr for n, gr in zip(names, grads)}}


def _case(rule, device, T, D, B=2, H=2, Dv=None, seed=0):
    case = make_case(rule, B=B, H=H, T=T, Dk=D, Dv=Dv or D, dtype=torch.float32, seed=seed)
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
def test_fla_form_refuses_what_fla_cannot_run(dtype, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # CPU tensors without the interpreter
    q = torch.zeros(1, 1, 4, 8, dtype=dtype)
    tokens = {"k": q, "v": q, "beta": q[..., 0], "log_alpha": q[..., 0]}
    want = r"runs on CUDA tensors \(or CPU ones under TRITON_INTERPRET=1\) of float32 / bfloat16 / float16"
    with pytest.raises(ValueError, match=want):
        fb.fla_form("gated_deltanet")(q, tokens, torch.zeros(1, 1, 8, 8, dtype=dtype), 64)


def test_impl_fla_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    case = _case("gated_deltanet", "cpu", T=4, D=16, B=1, H=1)
    with pytest.raises(ValueError, match=r"impl='fla' cannot run .* \(or TRITON_INTERPRET=1 on CPU\)"):
        case.run("fla")


@pytest.mark.gpu
@pytest.mark.parametrize("rule", FLA_RULES)
def test_fla_kernel_equals_our_chunk_form(rule):
    pytest.importorskip("fla")
    case = _case(rule, "cuda", T=100, D=32)  # T not a multiple of fla's chunk
    _compare(_run(case, "chunk"), _run(case, "fla"), rule, rel=1e-2)


# --- CPU: fla's kernels under the Triton interpreter ---------------------------------------------------

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1" and not torch.cuda.is_available()


#: interpreted forward + backward near or over 5 s on a shared 2-core machine (3.8-7 s; the others 0.3-1.7 s)
SLOW_INTERPRETED = {"comba", "kda", "rwkv7"}


@pytest.mark.skipif(not INTERPRETED, reason="needs TRITON_INTERPRET=1 on a machine without CUDA")
@pytest.mark.parametrize(
    "rule", [pytest.param(r, marks=pytest.mark.slow) if r in SLOW_INTERPRETED else r for r in FLA_RULES]
)
def test_fla_kernel_under_the_interpreter_equals_our_chunk_form(rule):
    pytest.importorskip("fla")
    # two heads and Dk != Dv (a layout or [K, V] / [V, K] mix-up shows); a nonzero initial state (read
    # as the carried state of every later chunk is); T = 40, one partial chunk of fla's 64; fla's dots
    # need dims >= 16
    case = _case(rule, "cpu", T=40, D=16, Dv=32, B=1, H=2)
    _compare(_run(case, "chunk"), _run(case, "fla"), rule, rel=1e-4)


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
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # impl="fla" takes CPU tensors (the references run)
    monkeypatch.setattr(fb, "_kernel", lambda r, q: refs[fb.FLA_KERNELS[r].split(":")[1]])
    _compare(_run(case, "chunk"), _run(case, "fla"), rule, rel=1e-4)


@pytest.mark.skipif(not INTERPRETED, reason="needs TRITON_INTERPRET=1 on a machine without CUDA")
def test_fla_imported_before_the_interpreter_was_set_is_named(monkeypatch):
    op = pytest.importorskip("fla.ops.utils.op")
    monkeypatch.setattr(op, "exp", object())  # what a compiled (not interpreted) fla kernel module holds
    case = _case("retnet", "cpu", T=4, D=16, B=1, H=1)
    with pytest.raises(RuntimeError, match="fla-core was imported before TRITON_INTERPRET=1 was set"):
        case.run("fla")
