"""Public TTT-MLP operator: validation and dispatch on ``impl=``."""

from __future__ import annotations

from torch import Tensor

from .._dispatch import TTTOutput, register_ttt_forms, run_ttt
from ..types import Impl, TTTState
from .chunk import chunk_ttt_mlp
from .reference import naive_recurrent_ttt_mlp

register_ttt_forms("ttt_mlp", naive_recurrent_ttt_mlp, chunk_ttt_mlp)
STATE_NAMES = ("W1", "b1", "W2", "b2")


def state_shapes(H: int, D: int, M: int) -> tuple[tuple[int, ...], ...]:
    """Per-head shapes of ``(W1, b1, W2, b2)`` for head dim D and hidden size M."""
    return (H, D, M), (H, M), (H, M, D), (H, D)


def ttt_mlp(
    q: Tensor, k: Tensor, v: Tensor, lr: Tensor | float, ln_weight: Tensor, ln_bias: Tensor, *,
    initial_state: tuple[Tensor, Tensor, Tensor, Tensor] | TTTState, token_eta: Tensor | None = None,
    mini_batch_size: int = 16, causal: bool = True, output_final_state: bool = False, eps: float = 1e-6,
    impl: Impl | str = Impl.CHUNK, check_finite: bool = False, cu_seqlens: Tensor | None = None,
    decode: bool = False,
) -> TTTOutput:  # fmt: skip
    """TTT-MLP (Sun et al. 2024): ``ttt_linear`` with inner model ``LN(gelu_tanh(x W1 + b1) W2 + b2)``.

    Args:
        q, k, v: ``[B, H, T, D]``.
        lr: ``[B, H, T]`` per-token inner learning rate, finite and >= 0 (or a float).
        ln_weight, ln_bias: ``[H, D]``.
        initial_state: ``(W1 [B, H, D, M], b1 [B, H, M], W2 [B, H, M, D], b2 [B, H, D])`` for any hidden
            size M (the paper uses 4D), leading B optional or 1; or the ``TTTState`` of a previous call.
        token_eta, mini_batch_size, causal, output_final_state, eps, impl, check_finite, cu_seqlens,
            decode: as ``ttt_linear`` (there is no separate primal form: off CUDA a decode step is a
            T = 1 call of the chunk form).

    Returns:
        ``TTTOutput(output [B, H, T, D], final_state or None)``.

    Examples::

        >>> import torch, ttt
        >>> B, H, T, D, M = 1, 2, 20, 8, 32
        >>> q, k, v = (torch.randn(B, H, T, D) for _ in range(3))
        >>> W1, W2 = torch.randn(H, D, M) * 0.02, torch.randn(H, M, D) * 0.02
        >>> o, _ = ttt.ops.ttt_mlp(q, k, v, torch.full((B, H, T), 0.1), torch.ones(H, D), torch.zeros(H, D),
        ...                        initial_state=(W1, torch.zeros(H, M), W2, torch.zeros(H, D)))
        >>> o.shape
        torch.Size([1, 2, 20, 8])
    """

    def shapes(H: int, D: int):
        W1 = initial_state.anchor[0] if isinstance(initial_state, TTTState) else initial_state[0]
        return state_shapes(H, D, W1.shape[-1] if isinstance(W1, Tensor) else 4 * D)

    return run_ttt(
        "ttt_mlp", shapes, STATE_NAMES, (q, k, v, lr, ln_weight, ln_bias),
        initial_state=initial_state, token_eta=token_eta, mini_batch_size=mini_batch_size, causal=causal,
        output_final_state=output_final_state, eps=eps, impl=impl, check_finite=check_finite,
        cu_seqlens=cu_seqlens, decode=decode,
    )  # fmt: skip
