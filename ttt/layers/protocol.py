"""The protocol every mixer in ``ttt.layers`` follows, and the input checks they share.

    y, state = layer(x, state=None, mask=None)   # x, y [B, T, C]; mask [B, T] bool, True = real token
    y, state = layer.step(x_t, state)            # x_t, y [B, 1, C]
    state = layer.init_state(batch_size, device=None, dtype=None)

Masks are right padding only (each row: real tokens, then padding). Right padding keeps the real tokens
at the positions (and, for TTT, in the mini-batches) they have in the unpadded sequence, which is what
makes a padded batch give the unpadded outputs at the real positions.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn


@runtime_checkable
class Mixer(Protocol):
    """Structural type of a sequence mixer (attention, TTT, linear-attention family)."""

    def __call__(self, x: Tensor, state: Any = None, mask: Tensor | None = None) -> tuple[Tensor, Any]: ...

    def step(self, x_t: Tensor, state: Any) -> tuple[Tensor, Any]: ...

    def init_state(self, batch_size: int, device: Any = None, dtype: Any = None) -> Any: ...


def param_dtype(layer: nn.Module) -> torch.dtype | None:
    """The dtype of the layer's first floating-point parameter (None without one)."""
    return next((p.dtype for p in layer.parameters() if p.is_floating_point()), None)


def check_input(
    name: str, x: Tensor, dim: int, *, step: bool = False, dtype: torch.dtype | None = None
) -> None:
    """Raise unless ``x`` is a floating ``[B, T, dim]`` tensor (``[B, 1, dim]`` for a step) of ``dtype``
    (the layer's parameter dtype, see :func:`param_dtype`); under autocast on x's device any floating
    dtype passes, autocast casts the projections."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: x must be a torch.Tensor [B, T, {dim}], got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: x must be floating point, got {x.dtype}")
    if dtype is not None and x.dtype != dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(
            f"{name}: x is {x.dtype} but the layer's parameters are {dtype}; convert one to the other "
            f"(layer.to({x.dtype}) or x.to({dtype})) or run under torch.autocast"
        )
    want = f"[B, 1, {dim}]" if step else f"[B, T, {dim}]"
    if x.dim() != 3 or x.shape[-1] != dim or (step and x.shape[1] != 1):
        raise ValueError(f"{name}: x must be {want}, got {list(x.shape)}")
    if x.shape[1] == 0:
        raise ValueError(f"{name}: x must hold at least one token, got {list(x.shape)}")


def check_mask(name: str, mask: Tensor | None, x: Tensor) -> Tensor | None:
    """Validate a right-padding mask ``[B, T]`` and return it as bool (``None`` stays ``None``)."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor) or mask.shape != x.shape[:2]:
        got = list(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"{name}: mask must be [B, T] = {list(x.shape[:2])}, got {got}")
    if mask.dtype != torch.bool:
        if mask.is_floating_point() or not ((mask == 0) | (mask == 1)).all():
            raise TypeError(f"{name}: mask must be bool (or 0/1 integers), got {mask.dtype}")
        mask = mask.bool()
    # right padding: once a row turns False it stays False
    if (mask[:, 1:] & ~mask[:, :-1]).any():
        raise ValueError(f"{name}: mask must be right padding (real tokens first, then padding in each row)")
    return mask


def split_heads(t: Tensor, num_heads: int) -> Tensor:
    """``[B, T, H*D]`` -> ``[B, H, T, D]``."""
    batch, length, width = t.shape
    return t.view(batch, length, num_heads, width // num_heads).transpose(1, 2)


def merge_heads(t: Tensor) -> Tensor:
    """``[B, H, T, D]`` -> ``[B, T, H*D]``."""
    batch, heads, length, head_dim = t.shape
    return t.transpose(1, 2).reshape(batch, length, heads * head_dim)
