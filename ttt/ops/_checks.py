"""Input validation shared by the public operators. Every message names what was expected."""

from __future__ import annotations

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_qkv(q: Tensor, k: Tensor, v: Tensor, *, same_qk_v_dim: bool = True) -> tuple[int, int, int, int]:
    """q, k ``[B, H, T, Dk]``, v ``[B, H, T, Dv]``; returns ``(B, H, T, Dk)``."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape [B, H, T, D], got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} must have shape [B, H, T, D] (4 dims), got {tuple(x.shape)}")
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16/bfloat16/float32/float64, got {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"q, k, v must be on one device, got q on {q.device} and {name} on {x.device}")
    if q.shape != k.shape:
        raise ValueError(
            f"q and k must have the same shape [B, H, T, D], got {tuple(q.shape)} and {tuple(k.shape)}"
        )
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"v must be [B, H, T, Dv] with B, H, T of q {tuple(q.shape[:3])}, got {tuple(v.shape)}"
        )
    if same_qk_v_dim and v.shape[3] != q.shape[3]:
        raise ValueError(f"v must have the head dim of q ({q.shape[3]}) for this operator, got {v.shape[3]}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
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
    if not isinstance(token_eta, Tensor) or tuple(token_eta.shape) != (b,):
        got = list(token_eta.shape) if isinstance(token_eta, Tensor) else type(token_eta).__name__
        raise ValueError(f"token_eta must have shape [mini_batch_size] = [{b}], got {got}")
    if token_eta.device != device:
        raise ValueError(f"token_eta must be on {device} like q, got {token_eta.device}")


def check_finite(**tensors: Tensor) -> None:
    """Raise where NaN/Inf would spread into the fast weights (opt-in: it synchronises on GPU)."""
    for name, x in tensors.items():
        if x is not None and not bool(torch.isfinite(x).all()):
            raise FloatingPointError(f"{name} contains NaN or Inf; the fast weights would be corrupted")


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
