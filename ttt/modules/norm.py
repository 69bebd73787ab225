"""Normalisation blocks: RMSNorm, and the gated RMSNorm on the outputs of gated linear-attention layers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dim, ``x / rms(x) * weight`` (Zhang & Sennrich, 2019).

    Computed in float32 (float64 for float64 input) so that bf16 activations do not lose the mean square.

    Args:
        dim: size of the last dim C.
        eps: added to the mean square. Default: ``1e-6`` (Llama, ttt-lm-pytorch ``rms_norm_eps``).
    """

    def __init__(self, dim: int, *, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        """``x [..., C]`` -> ``[..., C]`` in ``x.dtype``."""
        acc = x.float() if x.dtype != torch.float64 else x
        normed = acc * torch.rsqrt(acc.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (normed * self.weight.to(acc.dtype)).to(x.dtype)


class GatedRMSNorm(RMSNorm):
    """``RMSNorm(x) * act(gate)``: the output norm of Gated DeltaNet, Mamba2 and KDA-style layers.

    The gate comes from a separate projection of the layer input and lets the layer switch channels
    off (Yang et al. 2024, Gated DeltaNet; Mamba2 uses the same SiLU-gated norm).

    Args:
        dim, eps: as :class:`RMSNorm`.
        activation: ``"silu"`` (GDN, Mamba2) or ``"sigmoid"`` (KDA). Default: ``"silu"``.
    """

    def __init__(self, dim: int, *, eps: float = 1e-6, activation: str = "silu") -> None:
        super().__init__(dim, eps=eps)
        if activation not in ("silu", "sigmoid"):
            raise ValueError(f"activation must be 'silu' or 'sigmoid', got {activation!r}")
        self.activation = activation

    def forward(self, x: Tensor, gate: Tensor) -> Tensor:  # type: ignore[override]
        """``x, gate [..., C]`` -> ``[..., C]`` in ``x.dtype``."""
        gate = gate.to(x.dtype)
        return super().forward(x) * (F.silu(gate) if self.activation == "silu" else torch.sigmoid(gate))
