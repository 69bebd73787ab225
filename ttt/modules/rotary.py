"""Rotary position embedding (RoPE, Su et al. 2021) for q, k in the [B, H, T, D] layout.

The pairs rotated together are (d, d + D/2) ("rotate half", as Llama and GPT-NeoX); the official TTT
code uses interleaved pairs plus a permutation for checkpoint compatibility, which is the same
embedding up to a fixed reordering of the head dims.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def check_rope_theta(theta: float) -> float:
    """``theta`` if it is a finite number > 0 (a layer's ``rope_theta``), else a one-line ``ValueError``:
    a negative or zero base gives NaN / constant angles that only show up as a diverging loss."""
    if (
        isinstance(theta, bool)
        or not isinstance(theta, int | float)
        or not (math.isfinite(theta) and theta > 0)
    ):
        raise ValueError(f"rope_theta must be a finite number > 0, got {theta!r}")
    return float(theta)


def rotary_cos_sin(positions: Tensor, head_dim: int, *, theta: float = 10000.0) -> tuple[Tensor, Tensor]:
    """cos and sin tables for the given positions.

    Args:
        positions: integer positions, ``[T]`` or ``[B, T]``.
        head_dim: D, even.
        theta: base of the frequencies. Default: ``10000`` (Su et al.; ttt-lm-pytorch ``rope_theta``).

    Returns:
        ``(cos, sin)``, each float64 (cast to the compute dtype when applied), ``[T, D/2]`` or
        ``[B, 1, T, D/2]`` (broadcasts over heads).
    """
    if head_dim % 2:
        raise ValueError(f"rotary embedding needs an even head_dim, got {head_dim}")
    inv_freq = theta ** (
        -torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float64) / head_dim
    )
    angles = positions.to(torch.float64)[..., None] * inv_freq  # [..., T, D/2]
    if positions.dim() == 2:
        angles = angles[:, None]  # [B, 1, T, D/2]
    return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x [B, H, T, D]`` by the tables from :func:`rotary_cos_sin`; returns ``x.dtype``."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    x1, x2 = x.to(acc).chunk(2, dim=-1)
    cos, sin = cos.to(acc), sin.to(acc)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
