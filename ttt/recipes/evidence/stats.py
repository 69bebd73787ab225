"""Mean and spread over seeds, and the mini-batch phase profile of a per-position loss (experiment 1's
second sign: the loss repeating with TTT's mini-batch period)."""

from __future__ import annotations

import math
import statistics

import torch

__all__ = ["boundary_excess", "detrended_phase_profile", "fmt_ms", "mean_spread"]


def mean_spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0


def fmt_ms(values: list[float], digits: int = 3) -> str:
    """``mean ± sd (n)``."""
    m, s = mean_spread(values)
    return f"{m:.{digits}f} ± {s:.{digits}f} (n={len(values)})"


def detrended_phase_profile(loss: list[float] | torch.Tensor, period: int = 16) -> torch.Tensor:
    """``[period]``: mean of ``loss[p] - trend[p]`` over the positions p of phase ``p mod period``.

    ``trend`` is the centred moving average of width ``period + 1`` with half weights at both ends (the
    classical "2 x period" seasonal filter): it reproduces a linear trend exactly and removes any signal
    of that period, so a periodic signal plus a linear trend gives back the periodic signal minus its
    mean. Positions p run over ``[period, T - period/2)`` (the first period, where the loss still falls
    steeply, is left out); ``period`` must be even."""
    if period % 2:
        raise ValueError(f"period must be even, got {period}")
    x = torch.as_tensor(loss, dtype=torch.float64)
    half = period // 2
    kernel = torch.ones(period + 1, dtype=torch.float64) / period
    kernel[0] = kernel[-1] = 0.5 / period
    # trend[p] = sum_k kernel[k] x[p - half + k], stored at index p - half
    trend = torch.nn.functional.conv1d(x[None, None], kernel[None, None])[0, 0]  # [T - period]
    positions = torch.arange(period, x.numel() - half)
    if positions.numel() < period:
        raise ValueError(f"need at least {2 * period + half} positions for period {period}, got {x.numel()}")
    resid = x[positions] - trend[positions - half]
    phase = positions % period
    return torch.stack([resid[phase == k].mean() for k in range(period)])


def boundary_excess(profile: torch.Tensor) -> float:
    """Mean of a 16-phase profile at phases 15, 0, 1 (the mini-batch boundary) minus its mean at phases
    4..11 (mid-block), in the profile's units."""
    p = profile.tolist()
    return statistics.fmean([p[-1], p[0], p[1]]) - statistics.fmean(p[4:12])
