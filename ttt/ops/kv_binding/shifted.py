"""LaCT's shifted block-causal chunks in parallel form, with momentum and Muon (derivation: README.md).

Chunk n (tokens ``nC .. nC + C - 1``) is answered with the weights from before it, then takes one
step on the sum of its per-token updates. With the dot loss that sum is W-free,

    D_n = sum_{t in chunk n} k^_t^T v^_t          (= phi(K_n)^T (sign lr V_n))

so every chunk's momentum buffer ``V_n = mu V_{n-1} + D_n`` and step ``S_n = Muon(V_n)`` (or ``V_n``)
are known before any weight is, and

    W_{<n} = W_0 + sum_{j < n} S_j,    o_t = q^_t W_{<n(t)}

is one batched product for all D_n, one [N, N] momentum matrix, one batched Newton-Schulz, one
exclusive prefix sum over chunks and one batched product for the outputs.

Dim legend: b batch, h heads, n chunks, c position in a chunk, m feature (M), d value (Dv).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .muon import newton_schulz
from .reduction import EffectiveLinearAttention


def shifted_block_causal_parallel(
    eff: EffectiveLinearAttention,
    W0: Tensor,
    velocity: Tensor | None,
    chunk_size: int,
    muon: bool,
    muon_dtype: torch.dtype | None,
    output_final_state: bool,
) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
    """``kv_binding_parallel(..., shifted_chunk_size=chunk_size)``; arguments as there.

    Returns:
        o [B, H, T, Dv] and ``(W, V)`` after the last complete chunk, or None.
    """
    q, k, v = eff.q, eff.k, eff.v
    B, H, T, M = q.shape
    Dv = v.shape[-1]
    C = chunk_size
    N = -(-T // C)
    # zero-padded tokens add nothing to the last chunk's D_n, which no output reads anyway
    pad = N * C - T
    qs, ks, vs = (F.pad(x, (0, 0, 0, pad)).reshape(B, H, N, C, x.shape[-1]) for x in (q, k, v))
    W = W0.expand(B, H, M, Dv).to(q.dtype)
    V0 = torch.zeros_like(W) if velocity is None else velocity.expand_as(W).to(q.dtype)
    D = torch.einsum("bhncm,bhncd->bhnmd", ks, vs)  # [B, H, N, M, Dv]
    V = _momentum_buffers(D, V0, float(eff.momentum))  # [B, H, N, M, Dv]
    S = newton_schulz(V, dtype=muon_dtype) if muon else V
    # W before chunk n: exclusive prefix sum of the steps
    W_before = W[:, :, None] + torch.cumsum(S, dim=2) - S  # [B, H, N, M, Dv]
    o = torch.einsum("bhncm,bhnmd->bhncd", qs, W_before).reshape(B, H, N * C, Dv)[:, :, :T]
    if not output_final_state:
        return o, None
    # a partial last chunk has not taken its step yet: the state is at the last chunk boundary
    full = T // C
    if full == 0:
        return o, (W, V0)
    return o, (W + S[:, :, :full].sum(2), V[:, :, full - 1])


def _momentum_buffers(D: Tensor, V0: Tensor, mu: float) -> Tensor:
    """``V_n = mu V_{n-1} + D_n`` from ``V_{-1} = V0`` for every chunk at once:
    ``V_n = mu^(n+1) V0 + sum_{j <= n} mu^(n-j) D_j``. Only powers ``mu^m <= 1`` appear (no division
    by a cumulative product, which underflows on long sequences)."""
    if mu == 0.0:
        return D
    N = D.shape[2]
    n = torch.arange(N, dtype=D.dtype, device=D.device)
    lag = n[:, None] - n[None, :]  # n - j
    decay = torch.where(lag >= 0, mu ** lag.clamp(min=0), torch.zeros((), dtype=D.dtype))  # [N, N]
    V = torch.einsum("nj,bhjmd->bhnmd", decay, D)
    return V + (mu ** (n + 1))[:, None, None] * V0[:, :, None]
