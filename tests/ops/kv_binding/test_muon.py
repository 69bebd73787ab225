"""newton_schulz: Muon's quintic Newton-Schulz orthogonalisation (the formula of the folder's README)."""

from __future__ import annotations

import pytest
import torch

from ttt.ops.kv_binding import newton_schulz
from ttt.ops.kv_binding.muon import NS_COEFFICIENTS, NS_EPS


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("shape", [(24, 12), (12, 24), (3, 2, 40, 17)], ids=["tall", "wide", "batched"])
def test_singular_values_land_in_the_quintic_band(shape):
    """Rectangular Gaussian matrices keep their smallest singular value well above 1.5e-3 ||G||_F,
    where five quintic steps map every singular value into about [0.68, 1.2] (not exactly 1)."""
    s = torch.linalg.svdvals(newton_schulz(randn(*shape)))
    assert s.min().item() > 0.68 and s.max().item() < 1.2


@pytest.mark.parametrize("shape", [(9, 5), (5, 9)], ids=["tall", "wide"])
def test_keeps_singular_vectors_and_maps_singular_values_by_the_polynomial(shape):
    """``newton_schulz(U S V^T) = U p5(S / (||G||_F + eps)) V^T`` with p5 five steps of
    ``a s + b s^3 + c s^5``: the documented formula, checked in the SVD basis."""
    G = randn(*shape, seed=1)
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    in_basis = U.mT @ newton_schulz(G) @ Vh.mT  # [r, r], r = min(shape)
    s = S / (torch.linalg.matrix_norm(G) + NS_EPS)
    a, b, c = NS_COEFFICIENTS
    for _ in range(5):
        s = a * s + b * s**3 + c * s**5
    assert (in_basis - torch.diag(s)).abs().max().item() < 1e-12


def test_odd_and_zero_preserving():
    """Odd: gradient ascent (v^ -> -v^) flips each Muon step. An all-zero update stays zero."""
    G = randn(2, 7, 11, seed=2)
    assert torch.equal(newton_schulz(-G), -newton_schulz(G))
    assert torch.equal(newton_schulz(torch.zeros(4, 6)), torch.zeros(4, 6))


def test_low_precision_compute_dtype():
    """LaCT runs the iteration in bfloat16: the result comes back in the input dtype, close to fp64."""
    G = randn(16, 8, seed=3)
    low = newton_schulz(G, dtype=torch.bfloat16)
    assert low.dtype == torch.float64
    assert (low - newton_schulz(G)).abs().max().item() < 0.1
