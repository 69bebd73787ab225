"""Validation and the run of the chosen form, shared by ``ttt_linear`` and ``ttt_mlp``.

Kept in one place so that every TTT operator rejects bad input with the same messages; which form runs
is decided by :func:`ttt.ops.forms.resolve` from the operator's table (``register_ttt_forms``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from . import _checks
from ._state import fresh_state
from .common import compute_dtype, default_token_eta
from .forms import Form, register_form, resolve
from .types import Impl, TTTInputs, TTTState


class TTTOutput(NamedTuple):
    """``output`` ``[B, H, T, D]`` in the dtype of q; ``final_state`` or None."""

    output: Tensor
    final_state: TTTState | None


# the largest head dim the Triton kernels are tested at; "auto" does not send larger heads to them
MAX_TRITON_HEAD_DIM = 128


def register_ttt_forms(op: str, reference, chunk, recurrent=None) -> None:
    """The forms table of a TTT operator (``op`` = its ``variant``), most preferred first: the fused
    Triton kernels (``ttt/ops/<op>/triton``, CUDA, packed sequences in one launch, a decode kernel),
    the chunked dual form, the token-by-token primal form (decode), the autograd reference."""
    kernels = f"ttt.ops.{op}.triton"
    register_form(op, Form(
        "triton", f"{kernels}:triton_{op}", decode=True, decode_fn=f"{kernels}:decode_{op}", packed=True,
        devices=("cuda",), dtypes=(torch.float16, torch.bfloat16, torch.float32), requires="triton",
        auto_max_head_dim=MAX_TRITON_HEAD_DIM, interpreted=True,
    ))  # fmt: skip
    register_form(op, Form("chunk", chunk))
    if recurrent is not None:
        register_form(op, Form("recurrent", recurrent, decode=True, non_causal=False))
    register_form(op, Form("reference", reference, auto=False))


def run_ttt(
    variant: str,
    shapes_of: Callable[[int, int], tuple[tuple[int, ...], ...]],
    names: tuple[str, ...],
    tensors: tuple[Tensor, ...],
    *,
    initial_state,
    token_eta: Tensor | None,
    mini_batch_size: int,
    causal: bool,
    output_final_state: bool,
    eps: float,
    impl: Impl | str,
    check_finite: bool,
    cu_seqlens: Tensor | None = None,
    decode: bool = False,
) -> TTTOutput:
    """The body of ``ttt_linear`` / ``ttt_mlp``: ``tensors`` = (q, k, v, lr, ln_weight, ln_bias)."""
    q, k, v, lr, ln_weight, ln_bias = tensors
    B, H, T, D = _checks.check_qkv(q, k, v)
    _checks.check_per_token("lr", lr, B, H, T, q.device)
    _checks.check_per_head("ln_weight", ln_weight, H, D, q.device)
    _checks.check_per_head("ln_bias", ln_bias, H, D, q.device)
    _checks.check_mini_batch_size(mini_batch_size)
    if token_eta is None:
        token_eta = default_token_eta(mini_batch_size, q.device)
    _checks.check_token_eta(token_eta, mini_batch_size, q.device)
    decode = decode and causal and T == 1 and cu_seqlens is None
    form = resolve(variant, impl, q, causal=causal, decode=decode)
    cd = compute_dtype(q.dtype)
    lengths = _checks.check_cu_seqlens(cu_seqlens, B, T) if cu_seqlens is not None else None
    state = fresh_state(
        initial_state,
        shapes=shapes_of(H, D),
        names=names,
        batch_size=B if lengths is None else len(lengths),
        mini_batch_size=mini_batch_size,
        variant=variant,
        dtype=cd,
        device=q.device,
    )
    if not causal and state.offset != 0:
        raise ValueError(
            f"causal=False reads each mini-batch's final weights, so it cannot resume inside a mini-batch "
            f"(initial_state.offset={state.offset}); split non-causal sequences at multiples of "
            f"mini_batch_size={mini_batch_size}"
        )
    if check_finite:
        _checks.check_finite(q=q, k=k, v=v, lr=lr, ln_weight=ln_weight, ln_bias=ln_bias, token_eta=token_eta)
        named = {f"initial_state.anchor.{n}": t for n, t in zip(names, state.anchor)}
        named.update({f"initial_state.grad_sum.{n}": t for n, t in zip(names, state.grad_sum)})
        _checks.check_finite(**named)
    args = TTTInputs(q, k, v, lr, ln_weight, ln_bias, token_eta.to(cd))
    # the fast weights are float32 by contract: autocast must not lower the inner loop's matmuls
    with torch.autocast(q.device.type, enabled=False):
        o, final = _run(
            form, args, state, lengths, cu_seqlens, mini_batch_size, output_final_state, causal, eps, decode
        )
    return TTTOutput(o.to(q.dtype), final if output_final_state else None)


def _run(form, x, state, lengths, cu_seqlens, mini_batch_size, output_final_state, causal, eps, decode):
    fn = form.load(decode)
    if lengths is None:
        return fn(x, state, causal=causal, eps=eps)
    ends = {(state.offset + n) % mini_batch_size for n in lengths}
    if output_final_state and len(ends) > 1:
        raise ValueError(
            f"the packed sequences end at different positions of a mini-batch {sorted(ends)}, and one "
            "TTTState holds one offset: ask for no final state, or pack lengths congruent modulo "
            f"mini_batch_size={mini_batch_size}"
        )
    if form.packed:  # the form's own varlen path
        return fn(x, state, causal=causal, eps=eps, cu_seqlens=cu_seqlens)
    return _one_call_each(fn, x, state, lengths, causal=causal, eps=eps)


def _one_call_each(fn, x: TTTInputs, state: TTTState, lengths: list[int], *, causal: bool, eps: float):
    """Sequences packed along T (``[1, H, sum T_n, D]``) through a form without a varlen path."""
    outs, finals = [], []
    # cut once (slicing in the loop would make the backward quadratic in the number of sequences)
    for n, x_n in enumerate(x.split(lengths)):
        o, final = fn(x_n, state.rows(n, n + 1), causal=causal, eps=eps)
        outs.append(o)
        finals.append(final)
    same_offset = len({f.offset for f in finals}) == 1
    return torch.cat(outs, dim=2), TTTState.cat(finals) if same_offset else None
