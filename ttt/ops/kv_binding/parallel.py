"""Chunk-parallel evaluation of the reduced KV-binding TTT (Liu et al. 2026, Sec. 6.2).

Without momentum it is causal linear attention from W_0 (``ttt.ops.linear_attention``). With momentum
mu, the velocity ``V_t = mu V_{t-1} + D_t`` (``D_t = k^_t^T v^_t``) and ``W_t = W_{t-1} + V_t`` give, for
position t of a chunk that starts from (W_0, V_0),

    W_t = W_0 + s_t V_0 + sum_{i <= t} c_{t-i} D_i,   s_t = sum_{j=1}^{t} mu^j,  c_n = sum_{m=0}^{n} mu^m
    V_t = mu^t V_0 + sum_{i <= t} mu^{t-i} D_i

so ``o_t = q^_t W_t`` needs only [C, C] Toeplitz weights: sums of powers of mu <= 1, never a division
by a cumulative product (Liu et al.'s released parallel form for LaCT divides by cumprod(mu) and
underflows on long sequences). LaCT's shifted block-causal chunks, with or without Muon: ``shifted.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..common import default_token_eta
from ..family import linear_attention
from .muon import MUON_NEEDS_CHUNKS
from .reduction import EffectiveLinearAttention
from .shifted import shifted_block_causal_parallel


def kv_binding_parallel(
    eff: EffectiveLinearAttention,
    W0: Tensor,
    *,
    velocity: Tensor | None = None,
    chunk_size: int = 64,
    mini_batch_size: int = 1,
    token_eta: Tensor | None = None,
    causal: bool = True,
    shifted_chunk_size: int | None = None,
    muon: bool = False,
    muon_dtype: torch.dtype | None = None,
    output_final_state: bool = False,
) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
    """Evaluate the reduced TTT layer chunk-parallel.

    Args:
        eff: ``reduce_kv_binding(...)``: q^, k^ [B, H, T, M], v^ [B, H, T, Dv], momentum mu.
        W0: initial last-layer weights [B|1, H, M, Dv].
        velocity: initial momentum buffer ``V_0 = -U_0`` [B|1, H, M, Dv]. Default: zeros.
        chunk_size: tokens per chunk (online steps, ``mini_batch_size=1``).
        mini_batch_size: b > 1: mini-batch TTT as in ``ttt_general`` (every gradient of a mini-batch
            taken at its start; token i of it reads ``token_eta[i]`` times the running sum; momentum
            acts between mini-batches). The mini-batch is then the chunk.
        token_eta: [b]. Default ``1 / (i + 1)``.
        causal: False: every query of a mini-batch reads the weights after the whole mini-batch.
        shifted_chunk_size: C: LaCT's shifted block-causal chunks (its large-chunk mode). Every query
            of chunk i reads the weights after chunks < i (initial weights for chunk 0); then the
            weights take one step on the sum of chunk i's updates, with momentum per chunk. A
            non-causal mini-batch that reads *before* its own update, with ``token_eta = 1``: a
            chunk-strict causal mask. Not combined with ``mini_batch_size``/``causal=False``;
            ``chunk_size`` is unused. Default: None.
        muon: replace each chunk's step by its Newton-Schulz orthogonalisation (``newton_schulz``),
            applied to the momentum buffer: ``V_i = mu V_{i-1} + D_i``, ``W += Muon(V_i)``. Needs
            ``shifted_chunk_size``.
        muon_dtype: Newton-Schulz compute dtype (LaCT: bfloat16). Default: the input dtype.
        output_final_state: also return ``(W_T, V_T)`` (at a mini-batch / shifted-chunk boundary:
            a partial last one has not updated the state).

    Returns:
        o [B, H, T, Dv] and ``(W_T, V_T)`` or None.
    """
    if muon and shifted_chunk_size is None:
        raise ValueError(MUON_NEEDS_CHUNKS)
    if shifted_chunk_size is not None:
        if not isinstance(shifted_chunk_size, int) or shifted_chunk_size < 1:
            raise ValueError(f"shifted_chunk_size must be a positive int, got {shifted_chunk_size!r}")
        if mini_batch_size > 1 or not causal:
            raise ValueError(
                "shifted_chunk_size is its own chunk rule (read before, then update): leave "
                f"mini_batch_size=1 and causal=True, got {mini_batch_size} and {causal}"
            )
        return shifted_block_causal_parallel(
            eff, W0, velocity, shifted_chunk_size, muon, muon_dtype, output_final_state
        )
    if eff.q.shape[2] == 0:  # as every op: no token, an empty output and the state unchanged
        q, v = eff.q, eff.v
        W = W0.expand(q.shape[0], q.shape[1], q.shape[-1], v.shape[-1]).to(q.dtype)
        V = torch.zeros_like(W) if velocity is None else velocity.expand_as(W).to(q.dtype)
        return v.new_zeros(v.shape), ((W, V) if output_final_state else None)
    if mini_batch_size > 1 or not causal:
        return _mini_batch_parallel(eff, W0, velocity, mini_batch_size, token_eta, causal, output_final_state)
    q, k, v = eff.q, eff.k, eff.v
    B, H, T, M = q.shape
    W = W0.expand(B, H, M, v.shape[-1]).to(q.dtype)
    if eff.momentum == 0.0 and velocity is None:
        o, W_T = linear_attention(
            q, k, v, scale=1.0, initial_state=W, output_final_state=True, chunk_size=chunk_size
        )
        return o, ((W_T, torch.zeros_like(W_T)) if output_final_state else None)
    V = torch.zeros_like(W) if velocity is None else velocity.expand_as(W).to(q.dtype)
    o, W, V = _momentum_chunks(q, k, v, W, V, float(eff.momentum), chunk_size)
    return o, ((W, V) if output_final_state else None)


def _momentum_chunks(q: Tensor, k: Tensor, v: Tensor, W: Tensor, V: Tensor, mu: float, chunk_size: int):
    """Online steps with momentum ``mu`` from ``(W, V)`` [B, H, M, Dv], chunk by chunk (the closed form in
    the module docstring). Returns o [B, H, T, Dv] and the final ``(W, V)``."""
    B, H, T, M = q.shape
    C = chunk_size
    N = -(-T // C)
    pad = N * C - T
    qs, ks, vs = (F.pad(x, (0, 0, 0, pad)).reshape(B, H, N, C, x.shape[-1]) for x in (q, k, v))
    pos = torch.arange(C, dtype=q.dtype, device=q.device)
    powers = mu**pos  # mu^0 .. mu^(C-1)
    lag = pos[:, None] - pos[None, :]  # t - i
    causal = lag >= 0
    c_lag = torch.cumsum(powers, 0)  # c_n = sum_{m <= n} mu^m
    C_w = torch.where(causal, c_lag[lag.clamp(min=0).long()], torch.zeros((), dtype=q.dtype))  # [C, C]
    s = torch.cumsum(mu * powers, 0)  # s_t, t = position + 1
    outputs = []
    for n in range(N):
        q_n, k_n, v_n = qs[:, :, n], ks[:, :, n], vs[:, :, n]
        scores = (q_n @ k_n.transpose(-1, -2)) * C_w  # [B, H, C, C]
        outputs.append(q_n @ W + s[:, None] * (q_n @ V) + scores @ v_n)
        # state after the chunk's last real token L (padding would keep the velocity moving)
        L = min(C, T - n * C)
        to_end = (L - 1 - pos).clamp(min=0).long()  # L - 1 - i; padded tokens have D_i = 0
        W = W + s[L - 1] * V + (k_n * c_lag[to_end][:, None]).transpose(-1, -2) @ v_n
        V = mu**L * V + (k_n * powers[to_end][:, None]).transpose(-1, -2) @ v_n
    o = torch.stack(outputs, dim=2).reshape(B, H, N * C, -1)[:, :, :T]
    return o, W, V


def _mini_batch_parallel(eff, W0, velocity, b, token_eta, causal, output_final_state):
    """Mini-batch b: with ``D = sum_{j <= i} k^_j^T v^_j`` over the mini-batch so far,
    ``W_i = W + mu V + eta_i D_i`` (causal) or ``W + mu V + eta_last D_last`` (non-causal), and at its
    end ``V <- mu V + eta_last D_last``, ``W <- W + V``: one [b, b] masked product per mini-batch."""
    q, k, v = eff.q, eff.k, eff.v
    B, H, T, M = q.shape
    mu = float(eff.momentum)
    eta = default_token_eta(b, q.device, q.dtype) if token_eta is None else token_eta
    if tuple(eta.shape) != (b,):
        raise ValueError(f"token_eta must be [mini_batch_size] = [{b}], got {list(eta.shape)}")
    eta = eta.to(q.dtype)
    W = W0.expand(B, H, M, v.shape[-1]).to(q.dtype)
    V = torch.zeros_like(W) if velocity is None else velocity.expand_as(W).to(q.dtype)
    outputs = []
    for start in range(0, T, b):
        q_n, k_n, v_n = (x[:, :, start : start + b] for x in (q, k, v))
        c = q_n.shape[2]
        e = eta[:c]
        scores = q_n @ k_n.transpose(-1, -2)  # [B, H, c, c]
        if causal:
            scores = scores.tril() * e[:, None]
        else:
            scores = scores * e[-1]
        outputs.append(q_n @ (W + mu * V) + scores @ v_n)
        if c == b:
            V = mu * V + e[-1] * (k_n.transpose(-1, -2) @ v_n)
            W = W + V
    o = torch.cat(outputs, dim=2)
    return o, ((W, V) if output_final_state else None)
