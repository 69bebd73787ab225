"""The one base of the recurrent mixers (TTT-Linear, TTT-MLP and the family layers).

It holds what they share: the ``dim`` / ``num_heads`` checks, ``impl`` / ``decode_impl`` validated against
the operator's forms table (:mod:`ttt.ops.forms`) at construction, ``forward`` / ``step`` with the input
checks of :mod:`ttt.layers.protocol`, the state type check, and ``last_impl``, the form the last call ran.

A subclass sets ``op`` (the operator's name in the forms table) and ``state_type``, and implements
``init_state`` and ``_run(x, state, mask, decode) -> (y, state)``, calling :meth:`_form` with its queries
right before the operator to learn the form to run. A call is a decode step when it is one causal token
(``step``, or a one-token ``forward``): ``"auto"`` then prefers the operator's decode forms.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ttt.layers.protocol import check_input, check_mask, param_dtype
from ttt.ops.forms import check_impl, resolve


class RecurrentMixer(nn.Module):
    """Base of the layers whose state is fast weights (see the module docstring).

    Args:
        dim: model width C.
        num_heads: H (``dim % num_heads == 0``).
        impl: form of the operator in ``forward``; ``"auto"`` as defined in :mod:`ttt.ops.forms`.
        decode_impl: form in ``step`` (and in a one-token ``forward``); None: as ``impl``.
    """

    op: str
    state_type: type
    causal: bool = True

    def __init__(self, dim: int, num_heads: int, *, impl: Any, decode_impl: Any) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim must be divisible by num_heads, got dim={dim}, num_heads={num_heads}")
        self.dim, self.num_heads = dim, num_heads
        self.impl = check_impl(self.op, impl)
        self.decode_impl = self.impl if decode_impl is None else check_impl(self.op, decode_impl)
        self.last_impl: str | None = None

    def init_state(self, batch_size: int, device=None, dtype=None) -> Any:
        raise NotImplementedError

    def forward(self, x: Tensor, state: Any = None, mask: Tensor | None = None) -> tuple[Tensor, Any]:
        """``x [B, T, C]`` (a sequence or a piece of one) -> ``(y [B, T, C], state)``; ``mask`` ``[B, T]``
        bool, True = real token (right padding). Subclasses document what padding does to their state."""
        name = type(self).__name__
        check_input(name, x, self.dim, dtype=param_dtype(self))
        mask = check_mask(name, mask, x)
        return self._run(x, self._state(x, state), mask, decode=x.shape[1] == 1 and self.causal)

    def step(self, x_t: Tensor, state: Any) -> tuple[Tensor, Any]:
        """One decoding step with ``decode_impl``: ``x_t [B, 1, C]`` -> ``(y [B, 1, C], state)``."""
        check_input(f"{type(self).__name__}.step", x_t, self.dim, step=True, dtype=param_dtype(self))
        if not self.causal:
            raise ValueError(
                f"{type(self).__name__}(causal=False) reads each mini-batch's final weights, "
                "so it cannot decode token by token; use it in encoders only"
            )
        return self._run(x_t, self._state(x_t, state), None, decode=True)

    def _state(self, x: Tensor, state: Any) -> Any:
        if state is None:
            return self.init_state(x.shape[0], device=x.device, dtype=x.dtype)
        if not isinstance(state, self.state_type):
            want, got = self.state_type.__name__, type(state).__name__
            raise TypeError(f"{type(self).__name__}: state must be a {want}, got {got}")
        return state

    def _run(self, x: Tensor, state: Any, mask: Tensor | None, decode: bool) -> tuple[Tensor, Any]:
        raise NotImplementedError

    def _form(self, q: Tensor, decode: bool, op: str | None = None) -> str:
        """The name of the form that runs on queries ``q`` (recorded in ``last_impl``)."""
        impl = self.decode_impl if decode else self.impl
        name = resolve(op or self.op, impl, q, causal=self.causal, decode=decode).name
        self.last_impl = name
        return name
