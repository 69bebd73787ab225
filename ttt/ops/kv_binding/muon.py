"""Muon's orthogonalisation of an update matrix: the quintic Newton-Schulz iteration (Jordan et al.
2024), as LaCT applies it to each chunk's fast-weight update. Formula and coefficients: README.md."""

from __future__ import annotations

import torch
from torch import Tensor

# quintic p(s) = a s + b s^3 + c s^5: slope 3.4445 at 0 lifts small singular values fast, and five
# iterates leave them in a band around 1 rather than at 1: [0.68, 1.13] for s_0 >= 0.05 ||G||_F, up to
# 1.20 for smaller ones; below 1.5e-3 ||G||_F (common in square random matrices) they end below 0.68
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
# Muon's guard for an all-zero update (Frobenius norm 0)
NS_EPS = 1e-7

MUON_NEEDS_CHUNKS = (
    "muon=True needs chunked updates: set shifted_chunk_size=C (LaCT's shifted block-causal chunks). "
    "Muon orthogonalises the summed update of a chunk; the update of one token is rank 1"
)


def newton_schulz(G: Tensor, *, steps: int = 5, dtype: torch.dtype | None = None) -> Tensor:
    """Approximately ``U V^T`` for ``G = U S V^T``, per matrix in the last two dims.

    ``X_0 = G / (||G||_F + 1e-7)`` (transposed when G has more rows than columns, so ``X X^T`` is the
    smaller Gram matrix), then ``steps`` times ``A = X X^T``, ``X <- a X + (b A + c A A) X`` with
    ``(a, b, c) = (3.4445, -4.7750, 2.0315)``; transposed back at the end.

    Args:
        G: [..., R, C].
        steps: iterations. Default: 5 (Muon, LaCT).
        dtype: compute dtype (LaCT uses bfloat16). Default: ``G.dtype``.

    Returns:
        [..., R, C] in ``G.dtype``: ``U p(S) V^T`` with every singular value mapped near 1 (0 stays 0).
    """
    a, b, c = NS_COEFFICIENTS
    tall = G.shape[-2] > G.shape[-1]
    X = G.to(dtype or G.dtype)
    X = X.mT if tall else X
    X = X / (torch.linalg.matrix_norm(X, keepdim=True) + NS_EPS)
    for _ in range(steps):
        A = X @ X.mT  # [..., min(R, C), min(R, C)]
        X = a * X + (b * A + c * (A @ A)) @ X
    X = X.mT if tall else X
    return X.to(G.dtype)
