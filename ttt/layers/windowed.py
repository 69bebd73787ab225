"""Sliding-window softmax attention and a recurrent mixer in one layer, their outputs summed.

    y = SWA_W(x) + g * inner(x)            g [C], one gain per output channel

The window attends exactly to the newest W tokens; the inner mixer (TTT-Linear, TTT-MLP, Gated DeltaNet,
... any mixer of ``ttt.layers.MIXERS`` but attention) reads the whole past into its constant-size state.
The decoding state is the window's KV cache (the W - 1 newest tokens and the ``sink`` first ones) plus the
inner mixer's state: constant in the context length, as a whole model of recurrent mixers.

This is the pairing LoLCATs (Zhang et al. 2024, arXiv 2410.10254) puts in every layer of a linearised
transformer (softmax over the newest 64 tokens, linear attention for the rest), with one difference: there
both parts share one softmax normaliser, which a TTT output (``f_W(q)``, no normaliser) does not have, so
here the two outputs are added and the gain g learns how much the inner mixer contributes. With
``far_gate=True`` the window's heads are scaled by their estimated share of the full softmax (see
:class:`~ttt.layers.SoftmaxAttention`), the part of that shared normaliser a window can compute on its
own. For a conversion (``ttt convert --in-layer-window W``) g starts at zero, so the swapped layer is its
teacher's attention cut to the window (on contexts up to W the teacher itself) until the output gains are
fitted.

Shapes: B batch, T tokens, C model width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ttt.layers.attention import KVCache, SlidingWindowAttention
from ttt.layers.protocol import check_input, check_mask, param_dtype


@dataclass(frozen=True)
class WindowedState:
    """The state of :class:`WindowedMixer`: the window's KV cache and the inner mixer's state."""

    window: KVCache
    inner: Any

    def detach(self) -> WindowedState:
        return WindowedState(self.window.detach(), self.inner.detach())

    def nbytes(self) -> int:
        """Bytes held by both parts' tensors (the window's cache and the inner mixer's state)."""
        return self.window.nbytes() + self.inner.nbytes()


class WindowedMixer(nn.Module):
    """Sliding-window attention plus a recurrent mixer, summed (the ``"windowed"`` mixer; module docstring).

    Args:
        dim: model width C.
        num_heads: H query heads of the window (and heads of the inner mixer).
        inner: the inner mixer's name in ``ttt.layers.MIXERS`` (not ``attention``, ``swa`` or ``windowed``).
            Default: ``"ttt_linear"``.
        window: W, tokens each query sees through softmax attention, itself included. Default: ``64``
            (LoLCATs' window).
        inner_kwargs: constructor arguments of the inner mixer. Default: none (its own defaults).
        sink: the first ``sink`` tokens stay visible beside the window (attention sinks; see
            :class:`~ttt.layers.SoftmaxAttention`). Default: ``0``.
        num_kv_heads: key/value heads of the window (grouped-query attention). Default: ``num_heads``.
        rope_theta: RoPE base of the window. Default: ``10000``.
        gain_init: initial value of every entry of g. Default: ``1.0``.
        far_gate: scale the window's heads by their estimated share of the full softmax
            (:class:`~ttt.layers.SoftmaxAttention`'s ``far_gate``). Default: ``False``.

    Examples::

        >>> import torch
        >>> from ttt.layers import WindowedMixer
        >>> layer = WindowedMixer(dim=64, num_heads=4, inner="ttt_linear", window=8)
        >>> x = torch.randn(2, 20, 64)
        >>> y, state = layer(x[:, :19])
        >>> y_last, state = layer.step(x[:, 19:], state)
        >>> y.shape, state.window.k.shape[2]   # the window caches at most 7 tokens for the next query
        (torch.Size([2, 19, 64]), 7)
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        inner: str = "ttt_linear",
        window: int = 64,
        inner_kwargs: dict[str, Any] | None = None,
        sink: int = 0,
        num_kv_heads: int | None = None,
        rope_theta: float = 10000.0,
        gain_init: float = 1.0,
        far_gate: bool = False,
    ) -> None:
        super().__init__()
        from ttt.layers import make_mixer

        if inner in ("attention", "swa", "windowed"):
            raise ValueError(
                f"WindowedMixer: inner must be a recurrent mixer (ttt_linear, gated_deltanet, ...), "
                f"got {inner!r}"
            )
        self.dim, self.num_heads, self.inner_name = dim, num_heads, inner
        self.attn = SlidingWindowAttention(
            dim,
            num_heads,
            window=window,
            sink=sink,
            num_kv_heads=num_kv_heads,
            rope_theta=rope_theta,
            far_gate=far_gate,
        )
        self.inner = make_mixer(inner, dim, num_heads, inner_kwargs)
        if not getattr(self.inner, "causal", True):
            raise ValueError("WindowedMixer: the inner mixer must be causal")
        self.gain = nn.Parameter(torch.full((dim,), float(gain_init)))

    @property
    def window(self) -> int:
        return self.attn.window

    def init_state(self, batch_size: int, device=None, dtype=None) -> WindowedState:
        """Empty states of both parts for ``batch_size`` sequences."""
        return WindowedState(
            self.attn.init_state(batch_size, device=device, dtype=dtype),
            self.inner.init_state(batch_size, device=device, dtype=dtype),
        )

    def forward(
        self, x: Tensor, state: WindowedState | None = None, mask: Tensor | None = None
    ) -> tuple[Tensor, WindowedState]:
        """``x [B, T, C]`` -> ``(y [B, T, C], WindowedState)``; ``mask [B, T]`` bool, True = real token
        (right padding), passed to both parts (each documents what padding does to its state)."""
        check_input("WindowedMixer", x, self.dim, dtype=param_dtype(self))
        mask = check_mask("WindowedMixer", mask, x)
        if state is not None and not isinstance(state, WindowedState):
            raise TypeError(f"WindowedMixer: state must be a WindowedState, got {type(state).__name__}")
        a, window_state = self.attn(x, None if state is None else state.window, mask)
        r, inner_state = self.inner(x, None if state is None else state.inner, mask)
        return self.combine(a, r), WindowedState(window_state, inner_state)

    def combine(self, window_out: Tensor, inner_out: Tensor) -> Tensor:
        """``window_out + g * inner_out`` (both ``[B, T, C]``), g in the parts' dtype: under autocast the
        sum stays in the dtype the parts computed in. The one place the parts meet (``StaticDecoder`` too)."""
        return window_out + self.gain.to(inner_out.dtype) * inner_out

    def step(self, x_t: Tensor, state: WindowedState) -> tuple[Tensor, WindowedState]:
        """One decoding step: ``x_t [B, 1, C]`` -> ``(y [B, 1, C], WindowedState)``."""
        check_input("WindowedMixer.step", x_t, self.dim, step=True, dtype=param_dtype(self))
        return self.forward(x_t, state)

    def extra_repr(self) -> str:
        gate = ", far_gate=True" if self.attn.far_gate else ""
        return f"inner={self.inner_name!r}, window={self.window}{gate}"
