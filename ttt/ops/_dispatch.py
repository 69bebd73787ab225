"""Validation and ``impl=`` dispatch shared by ``ttt_linear`` and ``ttt_mlp``.

Kept in one place so that every TTT operator rejects bad input with the same messages and no form
is ever chosen silently.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import os
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from . import _checks
from ._state import fresh_state
from .common import compute_dtype, default_token_eta
from .types import Impl, TTTState


class TTTOutput(NamedTuple):
    """``output`` ``[B, H, T, D]`` in the dtype of q; ``final_state`` or None."""

    output: Tensor
    final_state: TTTState | None


# the largest head dim the Triton kernels are tested at; "auto" does not send larger heads to them
MAX_TRITON_HEAD_DIM = 128


@functools.cache
def _triton_installed() -> bool:
    # asked on every "auto" call on CUDA (each layer step): look it up once
    return importlib.util.find_spec("triton") is not None


def auto_impl(q: Tensor, has_triton_form: bool = True) -> Impl:
    """What ``impl="auto"`` runs for inputs like ``q`` ``[..., D]``: the Triton kernels on CUDA where they
    apply (fp32 / bf16 / fp16, D <= 128, Triton installed), the chunked dual form otherwise."""
    fits = q.dtype != torch.float64 and q.shape[-1] <= MAX_TRITON_HEAD_DIM
    if has_triton_form and q.is_cuda and fits and _triton_installed():
        return Impl.TRITON
    return Impl.CHUNK


def resolve_impl(impl: Impl | str, q: Tensor, forms: dict[Impl, Callable | str]) -> Callable:
    """Map ``impl`` to a callable; ``str`` entries are lazily imported ``module:function`` paths."""
    choice = Impl.parse(impl)
    if choice is Impl.AUTO:
        choice = auto_impl(q, Impl.TRITON in forms)
    if choice not in forms:
        have = ", ".join(repr(i.value) for i in forms)
        raise ValueError(f"impl={choice.value!r} is not available for this operator; choose one of {have}")
    form = forms[choice]
    if isinstance(form, str):
        if not (q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
            raise ValueError(
                f"impl={choice.value!r} needs CUDA tensors (or TRITON_INTERPRET=1 on CPU); q is on {q.device}"
            )
        module, name = form.split(":")
        try:
            form = getattr(importlib.import_module(module), name)
        except ImportError as err:
            raise ImportError(
                f"impl={choice.value!r} needs Triton and its kernels ({module}): {err}"
            ) from err
    return form


def run_ttt(
    form: dict[Impl, Callable | str],
    variant: str,
    shapes_of: Callable[[int, int], tuple[tuple[int, ...], ...]],
    names: tuple[str, ...],
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lr: Tensor | float,
    ln_weight: Tensor,
    ln_bias: Tensor,
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
) -> TTTOutput:
    B, H, T, D = _checks.check_qkv(q, k, v)
    lr = _checks.check_lr(lr, B, H, T, q.device, q.dtype)
    eps = _checks.check_eps(eps)
    _checks.check_per_head("ln_weight", ln_weight, H, D, q.device)
    _checks.check_per_head("ln_bias", ln_bias, H, D, q.device)
    _checks.check_mini_batch_size(mini_batch_size)
    if token_eta is None:
        token_eta = default_token_eta(mini_batch_size, q.device)
    _checks.check_token_eta(token_eta, mini_batch_size, q.device)
    fn = resolve_impl(impl, q, form)
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
    args = (q, k, v, lr, ln_weight, ln_bias, token_eta.to(cd))
    # the fast weights are float32 by contract: autocast must not lower the inner loop's matmuls
    with torch.autocast(q.device.type, enabled=False):
        o, final = _run(
            fn, args, state, lengths, cu_seqlens, mini_batch_size, output_final_state, causal, eps
        )
    o = o.to(q.dtype)
    if check_finite:
        named = {f"final_state.weights.{n}": t for n, t in zip(names, final.weights)} if final else {}
        _checks.check_no_overflow(output=o, **named)
    return TTTOutput(o, final if output_final_state else None)


def _run(fn, args, state, lengths, cu_seqlens, mini_batch_size, output_final_state, causal, eps):
    if lengths is not None:
        return _packed(fn, args, state, cu_seqlens, lengths, output_final_state, causal=causal, eps=eps)
    if isinstance(state.offset, tuple):
        return _per_offset(fn, args, state, causal=causal, eps=eps)
    return fn(*args, state, causal=causal, eps=eps)


def _per_offset(fn, args, state: TTTState, *, causal: bool, eps: float):
    """Rows at different mini-batch offsets (after a ragged prefill): one call per offset, rows put back."""
    q, k, v, lr, *rest = args
    groups: dict[int, list[int]] = {}
    for row, offset in enumerate(state.row_offsets()):
        groups.setdefault(offset, []).append(row)
    outs, finals, order = [], [], []
    for rows in groups.values():
        pick = torch.tensor(rows, dtype=torch.long, device=q.device)
        o, final = fn(*(x.index_select(0, pick) for x in (q, k, v, lr)), *rest, state.select(rows),
                      causal=causal, eps=eps)  # fmt: skip
        outs.append(o)
        finals.append(final)
        order += rows
    back = sorted(range(len(order)), key=order.__getitem__)  # position of row r in the grouped order
    o = torch.cat(outs, dim=0).index_select(0, torch.tensor(back, dtype=torch.long, device=q.device))
    return o, TTTState.cat(finals).select(back)


def _packed(fn, args, state: TTTState, cu_seqlens: Tensor, lengths: list[int], output_final_state: bool, *,
            causal: bool, eps: float):  # fmt: skip
    """Sequences packed along T (``[1, H, sum T_n, D]``): the kernel's own varlen path where one offset
    describes the result, else one call each (each sequence's final state at its own offset)."""
    b = state.mini_batch_size
    if "cu_seqlens" in inspect.signature(fn).parameters and isinstance(state.offset, int):
        if not output_final_state or len({(state.offset + n) % b for n in lengths}) == 1:
            return fn(*args, state, causal=causal, eps=eps, cu_seqlens=cu_seqlens)
    q, k, v, lr, *rest = args
    # cut once (slicing in the loop would make the backward quadratic in the number of sequences)
    per_seq = zip(*(x.split(lengths, dim=2) for x in (q, k, v, lr)))
    outs, finals = [], []
    for n, (q_n, k_n, v_n, lr_n) in enumerate(per_seq):
        if q_n.shape[2] == 0:  # an empty sequence (a fully padded row): no output, its state unchanged
            finals.append(state.rows(n, n + 1))
            continue
        o, final = fn(q_n, k_n, v_n, lr_n, *rest, state.rows(n, n + 1), causal=causal, eps=eps)
        outs.append(o)
        finals.append(final)
    return torch.cat(outs, dim=2), TTTState.cat(finals)
