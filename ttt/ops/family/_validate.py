"""Input checks shared by every family rule: one place, messages that name the expected shape/dtype."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import Tensor

from .. import common


def compute_dtype(x: Tensor) -> torch.dtype:
    """State and accumulation dtype: float64 for float64 inputs, float32 otherwise (bf16 / fp16 too)."""
    return common.compute_dtype(x.dtype)


# the layer that computed the gates, if any: a bad gate then names its real cause, the layer's input
_GATE_SOURCE: ContextVar[str | None] = ContextVar("gate_source", default=None)


@contextmanager
def gates_computed_by(layer: str) -> Iterator[None]:
    """Within the block, a failed gate check says that ``layer`` computed the gate from its input and
    parameters, so the message points there rather than at an argument the user never passed."""
    token = _GATE_SOURCE.set(layer)
    try:
        yield
    finally:
        _GATE_SOURCE.reset(token)


def _gate_error(name: str, message: str) -> ValueError:
    layer = _GATE_SOURCE.get()
    if layer is not None:
        message += f"; {layer} computed {name} from its input x and its parameters: do they hold NaN or Inf?"
    return ValueError(message)


def check_qkv(q: Tensor, k: Tensor | None, v: Tensor) -> tuple[int, int, int, int, int]:
    """Check q, k [B, H, T, Dk] and v [B, H, T, Dv]; return (B, H, T, Dk, Dv)."""
    named = [("q", q), ("v", v)] + ([("k", k)] if k is not None else [])
    for name, x in named:
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor [B, H, T, D], got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, H, T, D], got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
        if x.dtype != q.dtype:
            raise TypeError(f"q, k, v must share one dtype; q is {q.dtype}, {name} is {x.dtype}")
    B, H, T, Dk = q.shape
    if k is not None and tuple(k.shape) != (B, H, T, Dk):
        raise ValueError(f"k must have the shape of q [B, H, T, Dk] = {tuple(q.shape)}, got {tuple(k.shape)}")
    if tuple(v.shape[:3]) != (B, H, T):
        raise ValueError(f"v must be [B, H, T, Dv] with B, H, T = {(B, H, T)} (from q), got {tuple(v.shape)}")
    return B, H, T, Dk, v.shape[-1]


def check_gate(
    name: str,
    x: Tensor | float,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
) -> Tensor:
    """Check a gate against ``shape`` (exactly) and the range [low, high] (``(low, high]`` if
    ``low_open``); return it in ``dtype``. Range checks look at values only, never at the graph."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a tensor of shape {list(shape)}, got {type(x).__name__}")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    bracket = "(" if low_open else "["
    interval = f"{bracket}{'-inf' if low is None else low}, {'inf' if high is None else high}]"
    with torch.no_grad():
        # one flag, one host sync per gate on a GPU; the details are looked up only on failure
        bad = ~torch.isfinite(x)
        if low is not None:
            bad |= (x <= low) if low_open else (x < low)
        if high is not None:
            bad |= x > high
        if bool(bad.any()):
            # repr, not a rounded format: a max of 1.00003 must not print as "1" next to "(0, 1]"
            if not torch.isfinite(x).all():
                raise _gate_error(name, f"{name} must be finite (found NaN or Inf)")
            if low is not None and ((x <= low) if low_open else (x < low)).any():
                raise _gate_error(name, f"{name} must lie in {interval}, got min {x.min().item()!r}")
            raise _gate_error(name, f"{name} must lie in {interval}, got max {x.max().item()!r}")
    return x.to(dtype)


def resolve_log_decay(
    alpha: Tensor | None,
    log_alpha: Tensor | None,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    name: str = "alpha",
) -> Tensor:
    """The per-token decay in log space, ``log alpha <= 0``, from exactly one of ``alpha`` in (0, 1]
    or ``log_alpha`` in [-inf, 0] (finite). Long sequences only ever sum these logs, so nothing
    overflows (see README.md, 'Stability')."""
    if (alpha is None) == (log_alpha is None):
        raise ValueError(
            f"pass exactly one of {name}= (in (0, 1]) or log_{name}= (<= 0), shape {list(shape)}"
        )
    if alpha is not None:
        alpha = check_gate(name, alpha, shape, dtype, low=0.0, high=1.0, low_open=True)
        return torch.log(alpha)
    return check_gate(f"log_{name}", log_alpha, shape, dtype, high=0.0)


def check_state(
    initial_state: Tensor | None, B: int, H: int, Dk: int, Dv: int, dtype: torch.dtype, ref: Tensor
):
    """``initial_state`` [B, H, Dk, Dv] (or None = zeros), returned in the state dtype."""
    if initial_state is None:
        return torch.zeros(B, H, Dk, Dv, dtype=dtype, device=ref.device)
    if not isinstance(initial_state, Tensor):
        raise TypeError(f"initial_state must be a tensor [B, H, Dk, Dv], got {type(initial_state).__name__}")
    if tuple(initial_state.shape) != (B, H, Dk, Dv):
        raise ValueError(
            f"initial_state must be [B, H, Dk, Dv] = {[B, H, Dk, Dv]}, got {list(initial_state.shape)}"
        )
    return initial_state.to(dtype)


def resolve_scale(scale: float | None, Dk: int) -> float:
    """``scale`` multiplies q; None means ``Dk ** -0.5`` (the fla convention)."""
    if scale is None:
        return Dk**-0.5
    if not math.isfinite(scale):
        raise ValueError(f"scale must be a finite float, got {scale}")
    return float(scale)


def check_chunk_size(chunk_size: int) -> int:
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    return chunk_size
