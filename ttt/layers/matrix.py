"""Protocol plumbing shared by the family layers, whose state is a matrix ``S`` plus short-conv caches.

A subclass builds its projections and gates and implements ``_mix``; :class:`~ttt.layers.base.RecurrentMixer`
validates input and ``impl``, and records which form of the operator ran.

Shapes: B batch, T tokens, C model width, H heads, Dk key head dim, Dv value head dim.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

import ttt.ops.family
from ttt.layers.base import RecurrentMixer
from ttt.modules.conv import ShortConv
from ttt.ops._checks import gates_computed_by


@dataclass(frozen=True)
class MatrixState:
    """State of a family layer.

    Attributes:
        S: the fast-weight matrix ``[B, H, Dk, Dv]`` (float32, float64 for float64 inputs), or ``None``
            before the first token (zeros).
        convs: short-conv caches ``[B, width, K - 1]``, in the layer's order (empty without convs).
        lengths: ``[B]`` int64, real tokens seen per row (positions for layers with RoPE).
    """

    S: Tensor | None
    convs: tuple[Tensor, ...]
    lengths: Tensor

    def detach(self) -> MatrixState:
        """The same state cut from the autograd graph (truncated backprop through time)."""
        S = None if self.S is None else self.S.detach()
        return MatrixState(S, tuple(c.detach() for c in self.convs), self.lengths)

    def nbytes(self) -> int:
        """Bytes of the recurrent state (matrix and conv caches)."""
        tensors = ([self.S] if self.S is not None else []) + list(self.convs)
        return sum(t.numel() * t.element_size() for t in tensors)


class MatrixMixer(RecurrentMixer):
    """Base of the family layers.

    Args:
        dim: model width C.
        num_heads: H (``dim % num_heads == 0``).
        impl: form of the operator in ``forward``: ``"auto"`` | ``"chunk"`` | ``"recurrent"`` |
            ``"reference"`` (alias ``"autograd"``), or a registered backend (``ttt.ops.forms``).
        decode_impl: form in ``step`` and a one-token ``forward``.
        chunk_size: tokens per chunk of the chunk form.

    Subclasses set ``op`` (the family rule they run) and implement ``_mix``.

    ``forward(x [B, T, C], state=None, mask=None) -> (y, MatrixState)``: a padded token (``mask`` False,
    right padding) leaves ``S`` exactly unchanged (zero key and learning rate, no decay) and the conv
    caches keep each row's last real inputs, so the returned state continues exactly like the unpadded
    sequence.
    """

    state_type = MatrixState

    def __init__(
        self, dim: int, num_heads: int, *, impl: str = "auto", decode_impl: str = "auto", chunk_size: int = 64
    ) -> None:
        super().__init__(dim, num_heads, impl=impl, decode_impl=decode_impl)
        self.chunk_size = chunk_size

    def conv_modules(self) -> list[ShortConv]:
        """The layer's short convs, in the order their caches sit in ``MatrixState.convs``."""
        return []

    def init_state(self, batch_size: int, device=None, dtype=None) -> MatrixState:
        """Zero matrix (``S=None``), zero conv caches, zero lengths."""
        convs = tuple(c.init_cache(batch_size, device=device, dtype=dtype) for c in self.conv_modules())
        device = device or next(self.parameters()).device
        return MatrixState(None, convs, torch.zeros(batch_size, dtype=torch.long, device=device))

    def _run(self, x: Tensor, state: MatrixState, mask: Tensor | None, decode: bool):
        y, S, convs = self._mix(x, state, mask, decode)
        added = mask.sum(dim=1) if mask is not None else x.shape[1]
        return y, MatrixState(S, tuple(convs), state.lengths + added)

    def _mix(
        self, x: Tensor, state: MatrixState, mask: Tensor | None, decode: bool
    ) -> tuple[Tensor, Tensor, list[Tensor]]:
        """``(y [B, T, C], S, new conv caches)``; implemented by each layer."""
        raise NotImplementedError

    def _convolve(self, inputs: list[Tensor], state: MatrixState, mask: Tensor | None):
        """Run ``conv_modules()`` over ``inputs`` (same order); returns the outputs and the new caches."""
        convs = self.conv_modules()
        if not convs:
            return inputs, []
        pairs = [conv(t, cache, mask) for conv, t, cache in zip(convs, inputs, state.convs)]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    def _operator(self, *args: Tensor, state: MatrixState, decode: bool, **gates) -> tuple[Tensor, Tensor]:
        """Call ``ttt.ops.family.<op>`` from ``state.S``; returns ``(o [B, H, T, Dv], S)``."""
        op = getattr(ttt.ops.family, self.op)
        # under autocast, projections come out in bf16 but tensors scaled by a parameter in float32; the
        # op takes q, k, v in one dtype (and computes in float32 whatever it is): lift them to the widest
        dtype = functools.reduce(torch.promote_types, (a.dtype for a in args))
        args = tuple(a.to(dtype) for a in args)
        impl = self._form(args[0], decode)
        # the gates come from x: a NaN in x must be reported as such, not as a bad argument of the op
        with gates_computed_by(type(self).__name__):
            return op(*args, **gates, initial_state=state.S, output_final_state=True, impl=impl,
                      chunk_size=self.chunk_size)  # fmt: skip


def mask_tokens(mask: Tensor | None, *tensors: Tensor) -> list[Tensor]:
    """Zero the padded tokens of per-token tensors ``[B, H, T]`` or ``[B, H, T, D]`` (identity without mask).

    Zeroing the key (or the learning rate) stops a padded token from writing; zeroing a log-decay makes
    it keep the state as it is.
    """
    if mask is None:
        return list(tensors)
    out = []
    for t in tensors:
        real = mask[:, None, :].to(t.dtype)  # [B, 1, T]
        out.append(t * (real if t.dim() == 3 else real[..., None]))
    return out


def mamba_decay_init(num_heads: int, a_range: tuple[float, float] = (0.0, 16.0)) -> tuple[Tensor, Tensor]:
    """``(A_log, dt_bias)`` ``[H]`` as Mamba2 / GDN: A ~ U(a_range), dt log-uniform in [1e-3, 0.1].

    The decay is ``log alpha = -exp(A_log) * softplus(a + dt_bias)``; ``dt_bias`` is the inverse softplus
    of dt so that ``softplus(dt_bias) = dt`` at ``a = 0``. GDN draws A from U(0, 16), Mamba2 from U(1, 16).
    """
    A_log = torch.log(torch.empty(num_heads).uniform_(*a_range).clamp(min=1e-4))
    dt = torch.exp(torch.rand(num_heads) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp(min=1e-4)
    return A_log, dt + torch.log(-torch.expm1(-dt))
