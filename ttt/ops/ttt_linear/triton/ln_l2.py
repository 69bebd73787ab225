"""The LayerNorm pieces every TTT kernel shares, as row-wise ``@triton.jit`` helpers (inlined by Triton).

Rows are tokens, columns the D valid entries of a [BT, BD] tile (BD >= D, padding masked by ``m_d`` /
``m_td``). With ``xh = LN(z)`` without affine and ``rstd = 1 / sqrt(var(z) + eps)``:

- ``_ln_rows``: (xh, rstd);
- ``_ln_rows_bwd``: the LayerNorm Jacobian applied to a row gradient,
  ``dz = (dx - mean(dx) - xh mean(dx xh)) rstd``;
- ``_ln_l2_grad``: the inner gradient of TTT, ``G = d/dz 0.5 ||LN(z) gamma + beta - tgt||^2``
  = ``_ln_rows_bwd((xh gamma + beta - tgt) gamma)``, and what its backward needs;
- ``_ln_l2_grad_bwd``: the second-order backward of ``_ln_l2_grad`` (G depends on z through xh and rstd),
  derived in ``ttt/ops/ttt_linear/README.md`` ("Backward") and ``ttt/ops/ttt_mlp/triton/README.md``.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _ln_rows(z, m_d, D: tl.constexpr, eps):
    """Row LayerNorm statistics of z [BT, BD] over the D valid columns: (xhat, rstd [BT])."""
    mu = tl.sum(z, axis=1) / D
    zc = tl.where(m_d[None, :], z - mu[:, None], 0.0)
    var = tl.sum(zc * zc, axis=1) / D
    rstd = 1.0 / tl.sqrt(var + eps)
    return zc * rstd[:, None], rstd


@triton.jit
def _ln_rows_bwd(b_dx, b_xh, b_rstd, D: tl.constexpr):
    """dz = (dx - mean(dx) - xh * mean(dx * xh)) * rstd per row: the gradient through x = LN(z). [BT, BD]"""
    b_mean = tl.sum(b_dx, axis=1)[:, None] / D
    b_proj = (tl.sum(b_dx * b_xh, axis=1) / D)[:, None]
    return (b_dx - b_mean - b_xh * b_proj) * b_rstd[:, None]


@triton.jit
def _ln_l2_grad(b_z, b_tgt, b_gamma, b_beta, m_td, m_d, D: tl.constexpr, eps):
    """G = d/dZ 0.5 ||LN(Z) - tgt||^2 per row of Z [BT, BD] and what its backward needs: (G, xhat, rstd,
    gx = (LN(Z) - tgt) * gamma, m2 = mean(gx * xhat)); rows and columns outside ``m_td`` are zero."""
    b_xh, b_rstd = _ln_rows(b_z, m_d, D, eps)
    b_gx = (b_xh * b_gamma[None, :] + b_beta[None, :] - b_tgt) * b_gamma[None, :]
    b_m2 = tl.sum(b_gx * b_xh, axis=1) / D
    b_g = (b_gx - tl.sum(b_gx, axis=1)[:, None] / D - b_xh * b_m2[:, None]) * b_rstd[:, None]
    return tl.where(m_td, b_g, 0.0), b_xh, b_rstd, b_gx, b_m2


@triton.jit
def _ln_l2_grad_bwd(b_dg, b_g, b_xh, b_rstd, b_gx, b_m2, b_tgt, b_gamma, b_beta, m_td, D: tl.constexpr):
    """Second-order backward of ``_ln_l2_grad``: dG [BT, BD] -> (dZ, d tgt, d gamma, d beta) (the last two
    summed over rows). G = (gx - mean gx - xh mean(gx xh)) rstd, gx = (xh gamma + beta - tgt) gamma."""
    b_dg = tl.where(m_td, b_dg, 0.0)
    b_mdx = tl.sum(b_dg * b_xh, axis=1) / D
    # gradient w.r.t. gx
    b_gdx = (b_dg - tl.sum(b_dg, axis=1)[:, None] / D - b_xh * b_mdx[:, None]) * b_rstd[:, None]
    b_gdx = tl.where(m_td, b_gdx, 0.0)
    # gradient w.r.t. xhat (through G directly and through gx) and rstd
    b_gxh = -(b_m2[:, None] * b_dg + b_mdx[:, None] * b_gx) * b_rstd[:, None]
    b_gxh += b_gdx * b_gamma[None, :] * b_gamma[None, :]
    b_grstd = tl.sum(b_dg * b_g, axis=1) / b_rstd
    b_dgamma = tl.sum(b_gdx * (2.0 * b_gamma[None, :] * b_xh + b_beta[None, :] - b_tgt), axis=0)
    b_dbeta = tl.sum(b_gdx * b_gamma[None, :], axis=0)
    b_dtgt = -b_gdx * b_gamma[None, :]
    b_dz = _ln_rows_bwd(b_gxh, b_xh, b_rstd, D) - (b_grstd * b_rstd * b_rstd / D)[:, None] * b_xh
    return tl.where(m_td, b_dz, 0.0), b_dtgt, b_dgamma, b_dbeta
