"""Input validation shared by every public operator (TTT ops, ``ttt.attention``, the family rules,
KV binding): one place, and every message names what was expected."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_qkv(
    q: Tensor, k: Tensor | None, v: Tensor, *, same_qk_v_dim: bool = True
) -> tuple[int, int, int, int]:
    """q, k ``[B, H, T, Dk]``, v ``[B, H, T, Dv]`` (``k=None`` for rules without keys); returns
    ``(B, H, T, Dk)``."""
    named = [("q", q), ("k", k), ("v", v)] if k is not None else [("q", q), ("v", v)]
    for name, x in named:
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape [B, H, T, D], got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} must have shape [B, H, T, D] (4 dims), got {tuple(x.shape)}")
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16/bfloat16/float32/float64, got {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"q, k, v must be on one device, got q on {q.device} and {name} on {x.device}")
    if k is not None and q.shape != k.shape:
        raise ValueError(
            f"q and k must have the same shape [B, H, T, D], got {tuple(q.shape)} and {tuple(k.shape)}"
        )
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"v must be [B, H, T, Dv] with B, H, T of q {tuple(q.shape[:3])}, got {tuple(v.shape)}"
        )
    if same_qk_v_dim and v.shape[3] != q.shape[3]:
        raise ValueError(f"v must have the head dim of q ({q.shape[3]}) for this operator, got {v.shape[3]}")
    if any(x.dtype != q.dtype for _, x in named):
        raise TypeError(f"q, k, v must share a dtype, got {', '.join(str(x.dtype) for _, x in named)}")
    B, H, T, D = q.shape
    return B, H, T, D


def check_per_token(name: str, x: Tensor, B: int, H: int, T: int, device: torch.device) -> None:
    """Per-token scalars (inner learning rate, gates) are ``[B, H, T]``."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a tensor of shape [B, H, T] = {[B, H, T]}, got {type(x).__name__}")
    if tuple(x.shape) != (B, H, T):
        raise ValueError(f"{name} must have shape [B, H, T] = {[B, H, T]}, got {list(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor, got {x.dtype}")
    if x.device != device:
        raise ValueError(f"{name} must be on {device} like q, got {x.device}")


def check_swiglu_weights(params: tuple[Tensor, Tensor, Tensor], H: int, D: int, Dv: int) -> int:
    """LaCT's fast weights ``(W0 [H, D, M], W1 [H, M, Dv], W2 [H, D, M])`` against q's ``H, D`` and v's
    ``Dv``; returns ``M``."""
    if not (
        isinstance(params, (tuple, list)) and len(params) == 3 and all(isinstance(p, Tensor) for p in params)
    ):
        raise TypeError("params must be three tensors (W0 [H, D, M], W1 [H, M, Dv], W2 [H, D, M])")
    M = params[0].shape[-1]
    want = {"W0": ("[H, D, M]", (H, D, M)), "W1": ("[H, M, Dv]", (H, M, Dv)), "W2": ("[H, D, M]", (H, D, M))}
    for (name, (dims, shape)), p in zip(want.items(), params):
        if tuple(p.shape) != shape:
            raise ValueError(f"{name} must be {dims} = {list(shape)} (from q, v and W0), got {list(p.shape)}")
    return M


def check_lr(
    lr: Tensor | float, B: int, H: int, T: int, device: torch.device, dtype: torch.dtype = torch.float32
) -> Tensor:
    """The inner learning rate of every op: a constant or ``[B, H, T]``, finite and >= 0 at any
    mini-batch size (gradient ascent is the explicit ``ascent=True`` where an op offers it). Returns
    ``[B, H, T]``: a tensor keeps its dtype, a constant gets ``dtype``. One host sync for a tensor."""
    if isinstance(lr, Tensor):
        check_per_token("lr", lr, B, H, T, device)
        return check_gate("lr", lr, (B, H, T), lr.dtype, low=0.0)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)):
        raise TypeError(f"lr must be a float or a tensor [B, H, T] = {[B, H, T]}, got {type(lr).__name__}")
    if not math.isfinite(lr):
        raise ValueError("lr must be finite (found NaN or Inf)")
    if lr < 0:
        raise ValueError(f"lr must lie in [0.0, inf], got min {float(lr)!r}")
    return torch.full((B, H, T), float(lr), device=device, dtype=dtype)


def check_eps(eps: float) -> float:
    """The inner LayerNorm's ``eps``: a finite float > 0 (0 divides by zero on a constant row)."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be a finite float > 0, got {eps!r}")
    return float(eps)


def check_per_head(name: str, x: Tensor, H: int, D: int, device: torch.device) -> None:
    if not isinstance(x, Tensor) or tuple(x.shape) != (H, D):
        got = list(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must have shape [H, D] = {[H, D]}, got {got}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor, got {x.dtype}")
    if x.device != device:
        raise ValueError(f"{name} must be on {device} like q, got {x.device}")


def check_mini_batch_size(b: int) -> None:
    if isinstance(b, bool) or not isinstance(b, int) or b < 1:
        raise ValueError(f"mini_batch_size must be a positive int, got {b!r}")


def check_token_eta(token_eta: Tensor, b: int, device: torch.device) -> None:
    """``[b]`` per-position step factors, finite and >= 0 like ``lr`` (one host sync)."""
    if not isinstance(token_eta, Tensor) or tuple(token_eta.shape) != (b,):
        got = list(token_eta.shape) if isinstance(token_eta, Tensor) else type(token_eta).__name__
        raise ValueError(f"token_eta must have shape [mini_batch_size] = [{b}], got {got}")
    if token_eta.device != device:
        raise ValueError(f"token_eta must be on {device} like q, got {token_eta.device}")
    check_gate("token_eta", token_eta, (b,), token_eta.dtype, low=0.0)


def check_coefficient(name: str, x: float, *, high_open: bool) -> float:
    """An inner optimiser's coefficient (momentum, weight decay): a finite number in [0, 1) when
    ``high_open``, else in [0, 1]."""
    number = isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
    if not number or not (0 <= x < 1 if high_open else 0 <= x <= 1):
        raise ValueError(f"{name} must be a finite number in [0, 1{')' if high_open else ']'}, got {x!r}")
    return float(x)


def check_finite(**tensors: Tensor) -> None:
    """Raise where NaN/Inf would spread into the fast weights (opt-in: it synchronises on GPU)."""
    for name, x in tensors.items():
        if x is not None and not bool(torch.isfinite(x).all()):
            raise FloatingPointError(f"{name} contains NaN or Inf; the fast weights would be corrupted")


def check_no_overflow(**tensors: Tensor) -> None:
    """After a run from finite inputs: raise if an output or a fast weight overflowed to Inf/NaN
    (a step too large for the keys, or a value beyond the output dtype's range)."""
    for name, x in tensors.items():
        if x is not None and not bool(torch.isfinite(x).all()):
            raise FloatingPointError(
                f"{name} overflowed to Inf/NaN from finite inputs: the inner steps diverged or left the "
                f"range of {x.dtype} (lower lr, normalise the keys, or compute in a wider dtype)"
            )


def check_cu_seqlens(cu_seqlens: Tensor, B: int, T: int) -> list[int]:
    """``[N + 1]`` integer offsets ``0 = c_0 <= ... <= c_N = T`` of sequences packed along T (B must be 1)."""
    if B != 1:
        raise ValueError(
            f"with cu_seqlens the sequences are packed along T: q must be [1, H, sum T_n, D], got B={B}"
        )
    if (
        not isinstance(cu_seqlens, Tensor)
        or cu_seqlens.dim() != 1
        or cu_seqlens.dtype not in (torch.int32, torch.int64)
    ):
        raise ValueError("cu_seqlens must be a 1-D int32/int64 tensor [N + 1] of sequence offsets")
    bounds = cu_seqlens.tolist()
    if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != T or any(a > b for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"cu_seqlens must rise from 0 to T={T} (got {bounds})")
    return [b - a for a, b in zip(bounds, bounds[1:])]


def capturing(x: Tensor) -> bool:
    """Whether ``x`` is a CUDA tensor and the current CUDA stream is being captured into a graph. A value
    check would end the capture with an error (a host read is not allowed), so the checks on tensor values
    skip themselves then; the eager steps before the capture (``StaticDecoder`` runs them) checked the same
    computation. A CPU tensor never asks CUDA (no driver initialised by CPU work)."""
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


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
    if capturing(x):  # a CUDA graph cannot read a value on the host; its eager warm-up step checked them
        return x.to(dtype)
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
