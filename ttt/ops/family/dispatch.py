"""Shared plumbing of the public family ops: dtype handling, the forms table and the run of a rule.

Dtypes: inputs may be float16 / bfloat16 / float32 / float64 (one dtype for q, k, v); the state and
every operation of the forms run in float32 (float64 for float64 inputs) with autocast disabled, and
``o`` comes back in q's dtype, as in the TTT ops.

Forms (``impl=``, chosen by :func:`ttt.ops.forms.resolve`; every rule has the same table):
"chunk" (chunk-parallel), "recurrent" (token loop, closed form; decode) and "reference" (alias
"autograd": token loop, update by ``torch.func`` from the objective; never picked by "auto"). A form
function is called as ``fn(rule, q, tokens, S0, chunk_size=...) -> (o [B, H, T, Dv], S_T)`` with q
already scaled, ``tokens`` in the compute dtype (``alpha`` = exp(``log_alpha``) added when there is a
decay) and autocast off; a backend registers one for some rules with
``ttt.ops.forms.register_form(rule, Form(name, fn, ...), first=True)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import check_chunk_size, check_state, resolve_scale
from ..common import compute_dtype
from ..forms import Form, register_form, resolve
from .chunk import chunk_transition
from .engine import autograd_rule
from .fla_backend import register_fla_forms
from .recurrent import recurrent_transition
from .rules import RULES, Rule


def _chunk_form(rule: Rule, q: Tensor, tokens: dict[str, Tensor], S0: Tensor, *, chunk_size: int):
    return chunk_transition(q, rule.closed_form(tokens), S0, chunk_size)


def _recurrent_form(rule: Rule, q: Tensor, tokens: dict[str, Tensor], S0: Tensor, *, chunk_size: int):
    return recurrent_transition(q, rule.closed_form(tokens), S0)


def _autograd_form(rule: Rule, q: Tensor, tokens: dict[str, Tensor], S0: Tensor, *, chunk_size: int):
    return autograd_rule(rule.objective, q, tokens, S0)


for _name in RULES:
    register_form(_name, Form("chunk", _chunk_form))
    register_form(_name, Form("recurrent", _recurrent_form, decode=True))
    register_form(_name, Form("reference", _autograd_form, aliases=("autograd",), auto=False))
register_fla_forms()  # impl="fla": fla-core's Triton kernels on CUDA, asked for by name only


def run_rule(
    name: str,
    q: Tensor,
    v: Tensor,
    tokens: dict[str, Tensor],
    scale: float | None,
    initial_state: Tensor | None,
    output_final_state: bool,
    impl: str,
    chunk_size: int,
) -> tuple[Tensor, Tensor | None]:
    """Run rule ``name`` in the chosen form.

    ``tokens`` holds the validated per-token tensors, each [B, H, T] or [B, H, T, D], always including
    ``k`` and ``v`` (cast here to the compute dtype); decays enter as ``log_alpha`` (<= 0).
    """
    form = resolve(name, impl, q).load()
    check_chunk_size(chunk_size)
    dtype, out_dtype = compute_dtype(q.dtype), q.dtype
    B, H, T, Dk = q.shape
    S0 = check_state(initial_state, B, H, Dk, v.shape[-1], dtype, q)
    if T == 0:  # as every op: no token, an empty output and the state unchanged
        return q.new_zeros(B, H, 0, v.shape[-1]), (S0 if output_final_state else None)
    # the state is float32 by contract (as in the TTT ops): autocast must not lower the matmuls of the
    # scan, nor hand the triangular solver a bf16 system it has no kernel for
    with torch.autocast(q.device.type, enabled=False):
        q = q.to(dtype) * resolve_scale(scale, Dk)
        tokens = {n: x.to(dtype) for n, x in tokens.items()}
        if "log_alpha" in tokens:
            tokens["alpha"] = torch.exp(tokens["log_alpha"])
        o, S = form(RULES[name], q, tokens, S0, chunk_size=chunk_size)
    return o.to(out_dtype), (S if output_final_state else None)
