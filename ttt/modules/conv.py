"""Causal depthwise short convolution with a decoding cache (the "short conv" of Mamba, GDN and TTT (M))."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ShortConv(nn.Module):
    """Depthwise causal 1-D convolution over time: ``y_t = act(sum_i w_i * x_{t-K+1+i} + bias)``.

    The cache holds the last ``K - 1`` inputs, so ``forward`` on a split sequence and ``step`` token by
    token give the same outputs as one call.

    Args:
        dim: channels C.
        kernel_size: K. Default: ``4`` (Mamba ``d_conv``, ttt-lm-jax ``conv_width``).
        bias: learn a per-channel bias. Default: ``False``.
        activation: ``None`` or ``"silu"`` (Mamba, GDN use SiLU; the TTT (M) convs use none).
    """

    def __init__(self, dim: int, kernel_size: int = 4, *, bias: bool = False, activation: str | None = None):
        super().__init__()
        if kernel_size < 1:
            raise ValueError(f"kernel_size must be >= 1, got {kernel_size}")
        if activation not in (None, "silu"):
            raise ValueError(f"activation must be None or 'silu', got {activation!r}")
        self.dim, self.kernel_size, self.activation = dim, kernel_size, activation
        self.conv = nn.Conv1d(dim, dim, kernel_size, groups=dim, bias=bias)

    def init_cache(self, batch_size: int, *, device=None, dtype=None) -> Tensor:
        """Zeros ``[B, C, K - 1]``: the inputs before the sequence start count as zero (zero padding)."""
        weight = self.conv.weight
        return torch.zeros(
            batch_size,
            self.dim,
            self.kernel_size - 1,
            device=device or weight.device,
            dtype=dtype or weight.dtype,
        )

    def forward(
        self, x: Tensor, cache: Tensor | None = None, mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Convolve a chunk.

        Args:
            x: ``[B, T, C]``.
            cache: ``[B, C, K - 1]`` from a previous call, or ``None`` (start of sequence).
            mask: ``[B, T]`` bool, True = real token, right padding only. Padded inputs are zeroed, and
                the returned cache holds the last ``K - 1`` *real* inputs of each row, so a padded batch
                continues exactly like the unpadded sequences.

        Returns:
            ``(y [B, T, C], cache [B, C, K - 1])``.
        """
        batch, length, _ = x.shape
        if cache is None:
            cache = self.init_cache(batch, device=x.device, dtype=x.dtype)
        if mask is not None:
            x = x * mask[..., None].to(x.dtype)
        padded = torch.cat([cache.to(x.dtype), x.transpose(1, 2)], dim=2)  # [B, C, K-1+T]
        y = self._act(self.conv(padded)).transpose(1, 2)  # [B, T, C]
        if mask is None:
            new_cache = padded[:, :, length:]
        else:
            # the K-1 inputs ending at each row's last real token: columns len .. len+K-2 of `padded`
            lengths = mask.sum(dim=1)
            cols = lengths[:, None] + torch.arange(self.kernel_size - 1, device=x.device)  # [B, K-1]
            new_cache = padded.gather(2, cols[:, None, :].expand(-1, self.dim, -1))
        return y, new_cache

    def step(self, x_t: Tensor, cache: Tensor) -> tuple[Tensor, Tensor]:
        """One token: ``x_t [B, 1, C]``, ``cache [B, C, K - 1]`` -> ``(y [B, 1, C], new cache)``."""
        window = torch.cat([cache.to(x_t.dtype), x_t.transpose(1, 2)], dim=2)  # [B, C, K]
        y = (window * self.conv.weight[:, 0, :]).sum(dim=2)  # [B, C]
        if self.conv.bias is not None:
            y = y + self.conv.bias
        return self._act(y)[:, None, :], window[:, :, 1:]

    def _act(self, y: Tensor) -> Tensor:
        return F.silu(y) if self.activation == "silu" else y
