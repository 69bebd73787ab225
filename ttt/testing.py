"""Input factories and tolerance helpers shared by the tests (and usable by downstream code)."""

from __future__ import annotations

import torch
from torch import Tensor


def ttt_inputs(
    B: int = 2,
    H: int = 3,
    T: int = 37,
    D: int = 8,
    *,
    hidden: int | None = None,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    lr_scale: float = 0.3,
    requires_grad: bool = False,
) -> dict[str, Tensor | tuple[Tensor, ...]]:
    """Random TTT-Linear (``hidden=None``) or TTT-MLP inputs: q, k, v, lr, ln_weight, ln_bias, initial_state.

    Fast weights are ``[H, ...]`` (a learned W0 broadcast over the batch); scaled so the inner loop
    stays in a well-conditioned regime where float64 comparisons at 1e-10 are meaningful.
    """
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    out: dict = {
        "q": rand(B, H, T, D),
        "k": rand(B, H, T, D),
        "v": rand(B, H, T, D),
        "lr": (torch.rand(B, H, T, generator=g, dtype=torch.float64) * lr_scale).to(dtype),
        "ln_weight": 1 + rand(H, D, scale=0.2),
        "ln_bias": rand(H, D, scale=0.2),
    }
    if hidden is None:
        out["initial_state"] = (rand(H, D, D, scale=0.3), rand(H, D, scale=0.1))
    else:
        M = hidden
        out["initial_state"] = (rand(H, D, M, scale=0.4), rand(H, M, scale=0.1), rand(H, M, D, scale=0.4),
                                rand(H, D, scale=0.1))  # fmt: skip
    if requires_grad:
        for key, val in out.items():
            if isinstance(val, tuple):
                out[key] = tuple(t.clone().requires_grad_() for t in val)
            else:
                out[key] = val.clone().requires_grad_()
    return out


def grad_leaves(inputs: dict) -> list[Tensor]:
    """Every tensor of ``ttt_inputs(..., requires_grad=True)`` in a fixed order."""
    leaves = []
    for val in inputs.values():
        leaves.extend(val if isinstance(val, tuple) else [val])
    return [t for t in leaves if t.requires_grad]


def max_abs_diff(a, b) -> float:
    """Largest absolute difference over tensors or (nested) tuples of tensors."""
    if isinstance(a, Tensor):
        return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
    return max((max_abs_diff(x, y) for x, y in zip(a, b)), default=0.0)


def dtype_tolerance(dtype: torch.dtype, scale: float = 1.0) -> float:
    """Tolerance for a result in ``dtype`` relative to a float64 oracle of magnitude ``scale``.

    A few hundred ulps of the dtype, covering the accumulation over a mini-batch.
    """
    return {torch.float64: 1e-10, torch.float32: 2e-4, torch.float16: 3e-2, torch.bfloat16: 1e-1}[
        dtype
    ] * scale
