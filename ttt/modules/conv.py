"""Causal depthwise short convolution with a decoding cache (the "short conv" of Mamba, GDN and TTT (M))."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ShortConv(nn.Module):
    """Depthwise causal 1-D convolution over time: ``y_t = act(sum_i w_i * x_{t-K+1+i} + bias)``.

    The cache holds the last ``K - 1`` inputs, so ``forward`` on a split sequence, down to one token per
    call (decoding), gives the same outputs as one call.

    Args:
        dim: channels C.
        kernel_size: K. Default: ``4`` (Mamba ``d_conv``, ttt-lm-jax ``conv_width``).
        bias: learn a per-channel bias. Default: ``False``.
        activation: ``None`` or ``"silu"`` (Mamba, GDN use SiLU; the TTT (M) convs use none).
    """

    def __init__(self, dim: int, kernel_size: int = 4, *, bias: bool = False, activation: str | None = None):
        super().__init__()
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1:
            raise ValueError(f"kernel_size must be an int >= 1, got {kernel_size!r}")
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
        if cache is None:
            cache = self.init_cache(x.shape[0], device=x.device, dtype=x.dtype)
        padded, new_cache = causal_window(x, cache, mask)
        return self._act(self.conv(padded)).transpose(1, 2), new_cache

    def _act(self, y: Tensor) -> Tensor:
        return F.silu(y) if self.activation == "silu" else y


def causal_window(x: Tensor, cache: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """The inputs a causal window of ``K`` taps sees, and the cache to carry on.

    Args:
        x: ``[B, T, C]``; cache: ``[B, C, K - 1]`` (the last inputs before x); mask: ``[B, T]`` bool,
            True = real token, right padding only (padded inputs are zeroed).

    Returns:
        ``(padded [B, C, K - 1 + T], new cache [B, C, K - 1])``: the cache holds the last ``K - 1`` *real*
        inputs of each row, so a padded batch continues exactly like the unpadded sequences.
    """
    length, width = x.shape[1], cache.shape[2]
    if mask is not None:
        x = x * mask[..., None].to(x.dtype)
    padded = torch.cat([cache.to(x.dtype), x.transpose(1, 2)], dim=2)
    if mask is None:
        return padded, padded[:, :, length:]
    # the K-1 inputs ending at each row's last real token: columns len .. len+K-2 of `padded`
    cols = mask.sum(dim=1)[:, None] + torch.arange(width, device=x.device)  # [B, K-1]
    return padded, padded.gather(2, cols[:, None, :].expand(-1, padded.shape[1], -1))


class TokenShift(nn.Module):
    """The previous token's input, ``y_t = x_{t-1}`` (``x_{-1} = 0``): RWKV's token shift, with the same
    cache protocol as :class:`ShortConv` (the cache is the last real input ``[B, C, 1]``).

    Args:
        dim: channels C.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        # no parameters: an empty buffer follows .to() / .double() so caches default to the module's device
        self.register_buffer("_like", torch.empty(0), persistent=False)

    def init_cache(self, batch_size: int, *, device=None, dtype=None) -> Tensor:
        """Zeros ``[B, C, 1]``."""
        return torch.zeros(
            batch_size, self.dim, 1, device=device or self._like.device, dtype=dtype or self._like.dtype
        )

    def forward(
        self, x: Tensor, cache: Tensor | None = None, mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """``x [B, T, C]`` -> ``(x shifted by one token [B, T, C], cache [B, C, 1])``; mask as ShortConv's."""
        if cache is None:
            cache = self.init_cache(x.shape[0], device=x.device, dtype=x.dtype)
        padded, new_cache = causal_window(x, cache, mask)
        return padded[:, :, : x.shape[1]].transpose(1, 2), new_cache
