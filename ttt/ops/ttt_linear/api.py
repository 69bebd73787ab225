"""Public TTT-Linear operator: validation and dispatch on ``impl=``."""

from __future__ import annotations

from torch import Tensor

from .._dispatch import TTTOutput, register_ttt_forms, run_ttt
from ..types import Impl, TTTState
from .chunk import chunk_ttt_linear
from .recurrent import recurrent_ttt_linear
from .reference import naive_recurrent_ttt_linear

register_ttt_forms("ttt_linear", naive_recurrent_ttt_linear, chunk_ttt_linear, recurrent_ttt_linear)
STATE_NAMES = ("W", "b")


def state_shapes(H: int, D: int) -> tuple[tuple[int, ...], ...]:
    return (H, D, D), (H, D)


def ttt_linear(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lr: Tensor | float,
    ln_weight: Tensor,
    ln_bias: Tensor,
    *,
    initial_state: tuple[Tensor, Tensor] | TTTState,
    token_eta: Tensor | None = None,
    mini_batch_size: int = 16,
    causal: bool = True,
    output_final_state: bool = False,
    eps: float = 1e-6,
    impl: Impl | str = Impl.CHUNK,
    check_finite: bool = False,
    cu_seqlens: Tensor | None = None,
    decode: bool = False,
) -> TTTOutput:
    """TTT-Linear (Sun et al. 2024): mini-batch gradient descent on a LayerNorm'd linear model.

    Per head, the inner model is ``f(x) = LN(x W + b)`` and token j's inner loss is
    ``0.5 * ||f(k_j) - (v_j - k_j)||^2``. Token i (0-based inside its mini-batch of size b) reads
    ``theta_i = theta_0 - token_eta[i] * sum_{j <= i} lr_j * grad loss_j(theta_0)`` and outputs
    ``o_i = q_i + f_{theta_i}(q_i)``; the next mini-batch starts from the last token's weights.

    Args:
        q, k, v: ``[B, H, T, D]``, float16/bfloat16/float32/float64.
        lr: ``[B, H, T]`` per-token inner learning rate (already gated/scaled by the layer), finite and
            >= 0 (or a float).
            A token with ``lr = 0`` leaves the fast weights unchanged (how layers mask padding).
        ln_weight, ln_bias: ``[H, D]`` parameters of the inner LayerNorm.
        initial_state: ``(W [B, H, D, D], b [B, H, D])`` with the leading B optional or 1 (a learned
            W0 broadcast over the batch), or the ``TTTState`` of a previous call (resume anywhere).
        token_eta: ``[mini_batch_size]``. Default: ``1 / (i + 1)``.
        mini_batch_size: b. Default: 16. ``b = 1`` is online gradient descent.
        causal: if False, every query of a mini-batch reads the weights after the whole mini-batch.
        output_final_state: return the ``TTTState`` after the last token. Default: False.
        eps: LayerNorm epsilon, a finite float > 0. Default: 1e-6.
        impl: "chunk" (dual form, default), "reference" (autograd inner gradient, token by token),
            "recurrent" (primal form; decoding), "triton", or "auto" (see ``ttt.ops.forms``: triton on
            CUDA where it applies, else chunk; at a decode step triton on CUDA, else recurrent).
        check_finite: raise ``FloatingPointError`` if an input or the initial state holds NaN/Inf, or
            if the output or the final fast weights overflowed to Inf/NaN (synchronises on GPU).
        cu_seqlens: ``[N + 1]`` offsets of N sequences packed along T (q ``[1, H, sum T_n, D]``), each
            starting from its own row of the initial state (``[N, ...]`` or broadcast); the Triton form
            runs them in one launch, the others one call each. Default: None.
        decode: this call is a decode step (one causal token): "auto" prefers a decode form, and the
            Triton form runs its one-token kernel (inference only: its backward raises). Default: False.

    Returns:
        ``TTTOutput(output [B, H, T, D] in q's dtype, final_state or None)``. Fast weights are float32
        (float64 for float64 inputs); ``final_state.isfinite()`` flags corrupted sequences.

    Examples::

        >>> import torch, ttt
        >>> B, H, T, D = 2, 4, 40, 16
        >>> q, k, v = (torch.randn(B, H, T, D) for _ in range(3))
        >>> W0, b0 = torch.randn(H, D, D) * 0.02, torch.zeros(H, D)
        >>> o, state = ttt.ops.ttt_linear(q, k, v, torch.full((B, H, T), 0.1), torch.ones(H, D),
        ...                               torch.zeros(H, D), initial_state=(W0, b0), output_final_state=True)
        >>> o.shape, state.offset
        (torch.Size([2, 4, 40, 16]), 8)
    """
    return run_ttt(
        "ttt_linear", state_shapes, STATE_NAMES, (q, k, v, lr, ln_weight, ln_bias),
        initial_state=initial_state, token_eta=token_eta, mini_batch_size=mini_batch_size, causal=causal,
        output_final_state=output_final_state, eps=eps, impl=impl, check_finite=check_finite,
        cu_seqlens=cu_seqlens, decode=decode,
    )  # fmt: skip
