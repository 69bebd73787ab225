"""Types shared by every TTT operator: the execution-form enum and the explicit state."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor


class Impl(str, enum.Enum):
    """The built-in form names. ``impl=`` takes them (or any name registered in :mod:`ttt.ops.forms`);
    which forms an operator has, and what ``"auto"`` picks, is in its table there. No silent fallback.

    - ``REFERENCE``: token by token, inner gradient from ``torch.func`` (autograd). Slow, obviously right.
    - ``CHUNK``: the dual form, all work inside a mini-batch as matmuls; loop over mini-batches.
    - ``RECURRENT``: token by token with the closed-form inner gradient (the primal form of decoding).
    - ``TRITON``: fused GPU kernels (CUDA, or CPU under ``TRITON_INTERPRET=1``).
    - ``AUTO``: the first form of the operator's table that supports the call (see ``ttt.ops.forms``).
    """

    REFERENCE = "reference"
    CHUNK = "chunk"
    RECURRENT = "recurrent"
    TRITON = "triton"
    AUTO = "auto"

    @classmethod
    def parse(cls, value: Impl | str) -> Impl:
        try:
            return cls(value)
        except ValueError:
            names = ", ".join(repr(m.value) for m in cls)
            raise ValueError(f"impl must be one of {names}, got {value!r}") from None


class TTTInputs(NamedTuple):
    """The tensors every form of a TTT operator takes (``fn(x, state, *, causal, eps)``).

    q, k, v ``[B, H, T, D]``; lr ``[B, H, T]``; ln_weight, ln_bias ``[H, D]``; token_eta ``[b]``.
    """

    q: Tensor
    k: Tensor
    v: Tensor
    lr: Tensor
    ln_weight: Tensor
    ln_bias: Tensor
    token_eta: Tensor

    def to(self, dtype: torch.dtype) -> TTTInputs:
        """Every tensor in ``dtype`` (the forms compute in the dtype of the state's fast weights)."""
        return TTTInputs(*(t.to(dtype) for t in self))

    def split(self, lengths: list[int]) -> list[TTTInputs]:
        """The inputs of consecutive stretches of ``lengths`` tokens (q, k, v, lr cut along T, once)."""
        per_token = zip(*(t.split(lengths, dim=2) for t in self[:4]))
        return [TTTInputs(*cut, *self[4:]) for cut in per_token]

    def select_rows(self, rows: Tensor) -> TTTInputs:
        """The inputs of the batch rows ``rows`` (an index tensor) of q, k, v and lr."""
        return TTTInputs(*(t.index_select(0, rows) for t in self[:4]), *self[4:])


@dataclass(frozen=True)
class TTTState:
    """The explicit state of a TTT operator after some prefix of a sequence.

    Mini-batch TTT takes every inner gradient of a mini-batch at the weights the mini-batch started
    from (``anchor``). To resume in the middle of a mini-batch we therefore carry the anchor and the
    learning-rate-weighted gradient sum of the tokens already seen (``grad_sum``), plus how many
    tokens of the mini-batch those were (``offset``).

    Attributes:
        weights: fast weights of the last token seen, e.g. ``(W [B, H, D, D], b [B, H, D])``.
            This is what ``f_W`` would answer a query with.
        anchor: fast weights at the start of the current mini-batch (same layout).
        grad_sum: ``sum_{j < offset} lr_j * grad loss_j(anchor)`` (same layout).
        offset: tokens of the current mini-batch already consumed, ``0 <= offset < mini_batch_size``:
            one int for every row, or one per row (a tuple, when rows of different lengths were run
            packed or right-padded: each row then continues at its own position).
        mini_batch_size: the mini-batch size this state was produced with.
        variant: the operator that produced it (``"ttt_linear"``, ``"ttt_mlp"``, ...).
        velocity: momentum buffers of the general operator (empty when it has no momentum).
    """

    weights: tuple[Tensor, ...]
    anchor: tuple[Tensor, ...]
    grad_sum: tuple[Tensor, ...]
    offset: int | tuple[int, ...]
    mini_batch_size: int
    variant: str
    velocity: tuple[Tensor, ...] = ()

    def row_offsets(self) -> tuple[int, ...]:
        """The offset of every row, ``(offset_0, ..., offset_{B-1})``."""
        if isinstance(self.offset, tuple):
            return self.offset
        return (self.offset,) * self.anchor[0].shape[0]

    def select(self, index: list[int]) -> TTTState:
        """The state of rows ``index`` (in that order)."""
        pick = torch.tensor(index, dtype=torch.long, device=self.anchor[0].device)
        s = lambda ts: tuple(t.index_select(0, pick) for t in ts)  # noqa: E731
        offsets = one_or_per_row(self.row_offsets()[i] for i in index)
        return TTTState(s(self.weights), s(self.anchor), s(self.grad_sum), offsets, self.mini_batch_size,
                        self.variant, s(self.velocity))  # fmt: skip

    def isfinite(self) -> Tensor:
        """``[B]`` bool: True where every fast weight of that sequence is finite (no NaN/Inf)."""
        tensors = self.anchor + self.grad_sum + self.velocity
        flags = [torch.isfinite(t).flatten(1).all(dim=1) for t in tensors]
        return torch.stack(flags).all(dim=0)

    def rows(self, start: int, stop: int) -> TTTState:
        """The state of sequences ``start:stop`` of the batch."""
        r = lambda ts: tuple(t[start:stop] for t in ts)  # noqa: E731
        return TTTState(
            r(self.weights),
            r(self.anchor),
            r(self.grad_sum),
            self.offset if isinstance(self.offset, int) else one_or_per_row(self.offset[start:stop]),
            self.mini_batch_size,
            self.variant,
            r(self.velocity),
        )

    @staticmethod
    def cat(states: list[TTTState]) -> TTTState:
        """Stack the states of several sequences along the batch dim (rows at different offsets keep
        one offset each)."""
        first = states[0]
        c = lambda field: tuple(torch.cat(ts, dim=0) for ts in zip(*(getattr(s, field) for s in states)))  # noqa: E731
        return TTTState(
            c("weights"),
            c("anchor"),
            c("grad_sum"),
            one_or_per_row(o for s in states for o in s.row_offsets()),
            first.mini_batch_size,
            first.variant,
            c("velocity"),
        )

    def detach(self) -> TTTState:
        """The same state cut from the autograd graph (for truncated backprop through time)."""
        d = lambda ts: tuple(t.detach() for t in ts)  # noqa: E731
        return TTTState(
            d(self.weights),
            d(self.anchor),
            d(self.grad_sum),
            self.offset,
            self.mini_batch_size,
            self.variant,
            d(self.velocity),
        )


def one_or_per_row(offsets) -> int | tuple[int, ...]:
    """One int when every row sits at the same offset (the common case), else the per-row tuple."""
    offsets = tuple(int(o) for o in offsets)
    return offsets[0] if len(set(offsets)) == 1 else (offsets or 0)
