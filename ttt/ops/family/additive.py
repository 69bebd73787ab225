"""The additive rows of the family: linear attention, RetNet, Mamba2, GLA, HGRN2, Hebbian fast weights.

Each is one gradient step on ``-beta <S^T k, v> + 1/2 ||sqrt(Diag(1 - alpha)) S||_F^2`` (the decay
is the step on the state penalty), i.e. ``S_t = Diag(alpha_t) S_{t-1} + beta_t k_t v_t^T``; the chunk
form is decay-weighted chunked linear attention. Common arguments (every op):

    q, k: [B, H, T, Dk]; v: [B, H, T, Dv]; all one floating dtype.
    scale: multiplies q. Default: ``Dk ** -0.5``.
    initial_state: S_0 [B, H, Dk, Dv]. Default: zeros.
    output_final_state: also return S_T [B, H, Dk, Dv] (float32, float64 for float64 inputs).
    impl: "chunk" | "recurrent" | "autograd" (alias "reference").
    chunk_size: tokens per chunk for impl="chunk". Default: 64.

Returns ``(o [B, H, T, Dv] in q.dtype, S_T or None)`` with ``o_t = S_t^T (scale * q_t)``. Normalisers
and feature maps are left to the caller, as in the seed's table.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import check_gate, check_qkv, resolve_log_decay
from ..common import compute_dtype
from .dispatch import run_rule


def _per_head(name: str, x: Tensor | float, B: int, H: int, T: int, dtype, ref: Tensor, **bounds) -> Tensor:
    """A constant per head (float or [H]), or one per token ([B, H, T]), as [B, H, T] after its range
    check."""
    if isinstance(x, Tensor) and x.dim() == 3:
        return check_gate(name, x, (B, H, T), dtype, **bounds)
    x = torch.as_tensor(x, dtype=dtype, device=ref.device)
    if x.dim() == 0:
        x = x.expand(H)
    x = check_gate(name, x, (H,), dtype, **bounds)
    return x.view(1, H, 1).expand(B, H, T)


def linear_attention(
    q: Tensor, k: Tensor, v: Tensor, *,
    scale: float | None = None, initial_state: Tensor | None = None, output_final_state: bool = False,
    impl: str = "chunk", chunk_size: int = 64,
) -> tuple[Tensor, Tensor | None]:  # fmt: skip
    """Linear attention: one step on ``L = -<S^T k_t, v_t>``, ``S_t = S_{t-1} + k_t v_t^T``.

    Examples::

        >>> import torch, ttt.ops.family as fam
        >>> q, k, v = torch.randn(3, 1, 2, 10, 8).unbind(0)
        >>> o, _ = fam.linear_attention(q, k, v)
        >>> torch.allclose(o, ((q @ k.transpose(-1, -2)).tril() * 8 ** -0.5) @ v, atol=1e-5)
        True
    """
    check_qkv(q, k, v, same_qk_v_dim=False)
    tokens = {"k": k, "v": v}
    return run_rule(
        "linear_attention", q, v, tokens, scale, initial_state, output_final_state, impl, chunk_size
    )


def retnet(
    q: Tensor, k: Tensor, v: Tensor, *, alpha: Tensor | float, beta: Tensor | None = None,
    scale: float | None = None, initial_state: Tensor | None = None, output_final_state: bool = False,
    impl: str = "chunk", chunk_size: int = 64,
) -> tuple[Tensor, Tensor | None]:  # fmt: skip
    """RetNet (retention): ``S_t = alpha S_{t-1} + beta_t k_t v_t^T`` with a fixed decay per head.

    Args:
        alpha: decay gamma per head, float or [H], in (0, 1] (RetNet: ``1 - 2 ** (-5 - arange(H))``);
            or one per token [B, H, T] (a layer sets 1 on padding).
        beta: optional input scale [B, H, T], >= 0. Default: 1.
    """
    B, H, T, _ = check_qkv(q, k, v, same_qk_v_dim=False)
    dt = compute_dtype(q.dtype)
    alpha = _per_head("alpha", alpha, B, H, T, dt, q, low=0.0, high=1.0, low_open=True)
    beta = (
        torch.ones(B, H, T, dtype=dt, device=q.device)
        if beta is None
        else check_gate("beta", beta, (B, H, T), dt, low=0.0)
    )
    tokens = {"k": k, "v": v, "beta": beta, "log_alpha": torch.log(alpha)}
    return run_rule("retnet", q, v, tokens, scale, initial_state, output_final_state, impl, chunk_size)


def mamba2(
    q: Tensor, k: Tensor, v: Tensor, *, beta: Tensor, alpha: Tensor | None = None,
    log_alpha: Tensor | None = None,
    scale: float | None = None, initial_state: Tensor | None = None, output_final_state: bool = False,
    impl: str = "chunk", chunk_size: int = 64,
) -> tuple[Tensor, Tensor | None]:  # fmt: skip
    """Mamba2 (scalar-decay SSD): ``S_t = alpha_t S_{t-1} + beta_t k_t v_t^T``. In Mamba2's names
    q = C, k = B, v = x, ``alpha_t = exp(dt_t A)`` (``log_alpha = dt_t A``), ``beta_t = dt_t``; the
    skip term ``D x`` is outside the recurrence and left to the layer.

    Args:
        beta: input step [B, H, T], >= 0.
        alpha: decay [B, H, T] in (0, 1]; or instead ``log_alpha`` (<= 0).
    """
    B, H, T, _ = check_qkv(q, k, v, same_qk_v_dim=False)
    dt = compute_dtype(q.dtype)
    tokens = {"k": k, "v": v, "beta": check_gate("beta", beta, (B, H, T), dt, low=0.0)}
    tokens["log_alpha"] = resolve_log_decay(alpha, log_alpha, (B, H, T), dt)
    return run_rule("mamba2", q, v, tokens, scale, initial_state, output_final_state, impl, chunk_size)


def gla(
    q: Tensor, k: Tensor, v: Tensor, *, alpha: Tensor | None = None, log_alpha: Tensor | None = None,
    scale: float | None = None, initial_state: Tensor | None = None, output_final_state: bool = False,
    impl: str = "chunk", chunk_size: int = 64,
) -> tuple[Tensor, Tensor | None]:  # fmt: skip
    """Gated linear attention: ``S_t = Diag(alpha_t) S_{t-1} + k_t v_t^T``.

    Args:
        alpha: per-key-channel decay [B, H, T, Dk] in (0, 1]; or instead ``log_alpha`` (<= 0,
            fla's ``g``).
    """
    B, H, T, Dk = check_qkv(q, k, v, same_qk_v_dim=False)
    dt = compute_dtype(q.dtype)
    tokens = {"k": k, "v": v, "log_alpha": resolve_log_decay(alpha, log_alpha, (B, H, T, Dk), dt)}
    return run_rule("gla", q, v, tokens, scale, initial_state, output_final_state, impl, chunk_size)


def hgrn2(
    q: Tensor, v: Tensor, *, alpha: Tensor | None = None, log_alpha: Tensor | None = None,
    scale: float | None = None, initial_state: Tensor | None = None, output_final_state: bool = False,
    impl: str = "chunk", chunk_size: int = 64,
) -> tuple[Tensor, Tensor | None]:  # fmt: skip
    """HGRN2: ``S_t = Diag(alpha_t) S_{t-1} + (1 - alpha_t) v_t^T``. The key is tied to the forget
    gate (``k_t = 1 - alpha_t``, the HGRN2 paper's state expansion), so there is no ``k`` argument.

    Args:
        q: the output gate / query [B, H, T, Dk]; v: the input [B, H, T, Dv].
        alpha: forget gate [B, H, T, Dk] in (0, 1]; or instead ``log_alpha`` (<= 0).
    """
    B, H, T, Dk = check_qkv(q, None, v, same_qk_v_dim=False)
    dt = compute_dtype(q.dtype)
    log_alpha = resolve_log_decay(alpha, log_alpha, (B, H, T, Dk), dt)
    tokens = {"k": -torch.expm1(log_alpha), "v": v, "log_alpha": log_alpha}
    return run_rule("hgrn2", q, v, tokens, scale, initial_state, output_final_state, impl, chunk_size)


def hebbian(
    q: Tensor, k: Tensor, v: Tensor, *, decay: Tensor | float, lr: Tensor | float,
    scale: float | None = None, initial_state: Tensor | None = None, output_final_state: bool = False,
    impl: str = "chunk", chunk_size: int = 64,
) -> tuple[Tensor, Tensor | None]:  # fmt: skip
    """Hebbian fast weights (Ba et al. 2016, ``A(t+1) = lambda A(t) + eta h(t) h(t)^T``), the ancestor
    of the family: ``S_t = decay S_{t-1} + lr k_t v_t^T`` (pass k = v = h for the paper's
    auto-associative memory). Only the fast-weight memory is implemented, not the paper's inner
    "attention to the recent past" loop of the RNN around it.

    Args:
        decay: lambda, float or [H], in (0, 1]; or one per token [B, H, T].
        lr: eta, float or [H], >= 0; or one per token [B, H, T].
    """
    B, H, T, _ = check_qkv(q, k, v, same_qk_v_dim=False)
    dt = compute_dtype(q.dtype)
    lam = _per_head("decay", decay, B, H, T, dt, q, low=0.0, high=1.0, low_open=True)
    eta = _per_head("lr", lr, B, H, T, dt, q, low=0.0)
    tokens = {"k": k, "v": v, "beta": eta, "log_alpha": torch.log(lam)}
    return run_rule("hebbian", q, v, tokens, scale, initial_state, output_final_state, impl, chunk_size)
