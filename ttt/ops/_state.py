"""Turning a user's ``initial_state`` into a batch-expanded, compute-dtype ``TTTState`` and back."""

from __future__ import annotations

import torch
from torch import Tensor

from .types import TTTState


def fresh_state(
    initial_state: tuple[Tensor, ...] | TTTState,
    *,
    shapes: tuple[tuple[int, ...], ...],
    names: tuple[str, ...],
    batch_size: int,
    mini_batch_size: int,
    variant: str,
    dtype: torch.dtype,
    device: torch.device,
) -> TTTState:
    """Validate and normalise ``initial_state``.

    Args:
        initial_state: fast weights (each of shape ``shapes[i]`` with an optional leading batch dim of
            1 or ``batch_size``), or a ``TTTState`` from a previous call of the same operator.
        shapes: per-tensor shapes without the batch dim, e.g. ``((H, D, D), (H, D))``.
    Returns:
        A ``TTTState`` whose tensors are ``[batch_size, *shape]`` in ``dtype`` (autograd preserved).
    """
    if isinstance(initial_state, TTTState):
        st = initial_state
        if st.variant != variant:
            raise ValueError(f"initial_state was produced by {st.variant!r}, expected a {variant!r} state")
        if st.mini_batch_size != mini_batch_size:
            raise ValueError(
                f"initial_state was produced with mini_batch_size={st.mini_batch_size}, "
                f"this call uses mini_batch_size={mini_batch_size}"
            )
        if isinstance(st.offset, tuple) and len(st.offset) != batch_size:
            raise ValueError(
                f"initial_state holds {len(st.offset)} rows at their own offsets, this call has {batch_size}"
            )
        anchor = _expand_all(st.anchor, shapes, names, batch_size, dtype, device)
        grad_sum = _expand_all(st.grad_sum, shapes, names, batch_size, dtype, device)
        if st.offset == 0:  # a mini-batch boundary: nothing is pending, whatever grad_sum holds
            grad_sum = tuple(torch.zeros_like(g) for g in grad_sum)
        elif isinstance(st.offset, tuple):  # the same, row by row
            pending = torch.tensor([o != 0 for o in st.offset], device=device)
            grad_sum = tuple(g * pending.view(-1, *[1] * (g.dim() - 1)).to(g.dtype) for g in grad_sum)
        weights = _expand_all(st.weights, shapes, names, batch_size, dtype, device)
        return TTTState(weights, anchor, grad_sum, st.offset, mini_batch_size, variant)
    if not isinstance(initial_state, (tuple, list)):
        raise TypeError(
            f"initial_state must be a tuple {names} of fast weights or a TTTState, "
            f"got {type(initial_state).__name__}"
        )
    anchor = _expand_all(tuple(initial_state), shapes, names, batch_size, dtype, device)
    zeros = tuple(torch.zeros_like(t) for t in anchor)
    return TTTState(anchor, anchor, zeros, 0, mini_batch_size, variant)


def _expand_all(tensors, shapes, names, batch_size, dtype, device) -> tuple[Tensor, ...]:
    if len(tensors) != len(shapes):
        raise ValueError(f"initial_state must hold {len(shapes)} tensors {names}, got {len(tensors)}")
    return tuple(_expand(t, s, n, batch_size, dtype, device) for t, s, n in zip(tensors, shapes, names))


def _expand(t: Tensor, shape, name, batch_size, dtype, device) -> Tensor:
    expected = f"{list(shape)} or [B, *{list(shape)}] with B in (1, {batch_size})"
    if not isinstance(t, Tensor):
        raise TypeError(f"initial_state {name} must be a tensor of shape {expected}")
    if t.device != device:
        raise ValueError(f"initial_state {name} must be on {device} like q, got {t.device}")
    if tuple(t.shape) == tuple(shape):
        t = t.unsqueeze(0)
    if t.dim() != len(shape) + 1 or tuple(t.shape[1:]) != tuple(shape) or t.shape[0] not in (1, batch_size):
        raise ValueError(f"initial_state {name} must have shape {expected}, got {list(t.shape)}")
    return t.to(dtype).expand(batch_size, *shape)


def last_token_weights(anchor, grad_sum, offset: int, token_eta: Tensor) -> tuple[Tensor, ...]:
    """Fast weights of the last consumed token: ``anchor - token_eta[offset-1] * grad_sum``."""
    if offset == 0:
        return anchor
    return tuple(a - token_eta[offset - 1] * g for a, g in zip(anchor, grad_sum))
