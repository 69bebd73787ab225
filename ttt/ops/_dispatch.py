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
    lr = _checks.check_lr(lr, B, H, T, q.device, q.dtype)
    eps = _checks.check_eps(eps)
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
    if not causal and any(state.row_offsets()):
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
    if T == 0:  # every form alike (the fused kernels included): an empty output, the state unchanged
        return TTTOutput(q.new_zeros(B, H, 0, D), state if output_final_state else None)
    args = TTTInputs(q, k, v, lr, ln_weight, ln_bias, token_eta.to(cd))
    # the fast weights are float32 by contract: autocast must not lower the inner loop's matmuls
    with torch.autocast(q.device.type, enabled=False):
        o, final = _run(
            form, args, state, lengths, cu_seqlens, mini_batch_size, output_final_state, causal, eps, decode
        )
    o = o.to(q.dtype)
    if check_finite:
        named = {f"final_state.weights.{n}": t for n, t in zip(names, final.weights)} if final else {}
        _checks.check_no_overflow(output=o, **named)
    return TTTOutput(o, final if output_final_state else None)


def _run(form, x, state, lengths, cu_seqlens, mini_batch_size, output_final_state, causal, eps, decode):
    fn = form.load(decode)
    if lengths is not None:
        return _packed(form, fn, x, state, cu_seqlens, lengths, output_final_state, causal=causal, eps=eps)
    if isinstance(state.offset, tuple):
        return _per_offset(fn, x, state, causal=causal, eps=eps)
    return fn(x, state, causal=causal, eps=eps)


def _per_offset(fn, x: TTTInputs, state: TTTState, *, causal: bool, eps: float):
    """Rows at different mini-batch offsets (after a ragged prefill): one call per offset, rows put back."""
    groups: dict[int, list[int]] = {}
    for row, offset in enumerate(state.row_offsets()):
        groups.setdefault(offset, []).append(row)
    outs, finals, order = [], [], []
    for rows in groups.values():
        pick = torch.tensor(rows, dtype=torch.long, device=x.q.device)
        o, final = fn(x.select_rows(pick), state.select(rows), causal=causal, eps=eps)
        outs.append(o)
        finals.append(final)
        order += rows
    back = sorted(range(len(order)), key=order.__getitem__)  # position of row r in the grouped order
    o = torch.cat(outs, dim=0).index_select(0, torch.tensor(back, dtype=torch.long, device=x.q.device))
    return o, TTTState.cat(finals).select(back)


def _packed(form, fn, x: TTTInputs, state: TTTState, cu_seqlens: Tensor, lengths: list[int],
            output_final_state: bool, *, causal: bool, eps: float):  # fmt: skip
    """Sequences packed along T (``[1, H, sum T_n, D]``): the form's own varlen path where one offset
    describes the result, else one call each (each sequence's final state at its own offset)."""
    b = state.mini_batch_size
    if form.packed and isinstance(state.offset, int):
        if not output_final_state or len({(state.offset + n) % b for n in lengths}) == 1:
            return fn(x, state, causal=causal, eps=eps, cu_seqlens=cu_seqlens)
    outs, finals = [], []
    # cut once (slicing in the loop would make the backward quadratic in the number of sequences)
    for n, x_n in enumerate(x.split(lengths)):
        if x_n.q.shape[2] == 0:  # an empty sequence (a fully padded row): no output, its state unchanged
            finals.append(state.rows(n, n + 1))
            continue
        o, final = fn(x_n, state.rows(n, n + 1), causal=causal, eps=eps)
        outs.append(o)
        finals.append(final)
    return torch.cat(outs, dim=2), TTTState.cat(finals)
