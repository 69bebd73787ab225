"""Differentiable point-to-point and all-gather over ``torch.distributed``, with a byte counter.

Every message the context-parallel ops exchange goes through this module, so ``COUNTER`` sees all of
it. The counter records what *this rank* puts on the wire:

- ``send``: the tensor's bytes;
- ``all_gather`` of a slab of ``n`` bytes over R ranks: ``(R - 1) * n`` (each rank's slab must reach the
  R - 1 others; a ring all-gather sends exactly that much per rank);
- ``all_reduce`` of ``n`` bytes (the all-gather's backward: gloo has no reduce-scatter): ``2 (R - 1) n / R``
  (ring all-reduce: a reduce-scatter then an all-gather).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd import Function


@dataclass
class CommCounter:
    """Bytes and messages this rank sent, split by direction (``"forward"`` / ``"backward"``)."""

    bytes: dict[str, int] = field(default_factory=lambda: {"forward": 0, "backward": 0})
    messages: dict[str, int] = field(default_factory=lambda: {"forward": 0, "backward": 0})

    def add(self, nbytes: int, direction: str) -> None:
        self.bytes[direction] += int(nbytes)
        self.messages[direction] += 1

    def reset(self) -> None:
        for d in self.bytes:
            self.bytes[d] = 0
            self.messages[d] = 0


COUNTER = CommCounter()


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def group_rank_world(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """``(rank, world size)`` of this process inside ``group`` (the default group when None)."""
    if not dist.is_initialized():
        raise RuntimeError("this needs torch.distributed initialised (dist.init_process_group) first")
    return dist.get_rank(group), dist.get_world_size(group)


def _global(group: dist.ProcessGroup | None, rank: int) -> int:
    return rank if group is None else dist.get_global_rank(group, rank)


def send(tensors: tuple[Tensor, ...], dst: int, group, tag: int, direction: str) -> None:
    """Blocking send of each tensor to group rank ``dst``."""
    for t in tensors:
        COUNTER.add(_nbytes(t), direction)
        dist.send(t.contiguous(), _global(group, dst), group=group, tag=tag)


def recv(like: tuple[Tensor, ...], src: int, group, tag: int) -> tuple[Tensor, ...]:
    """Blocking receive of tensors shaped like ``like`` from group rank ``src``."""
    out = tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in like)
    for t in out:
        dist.recv(t, _global(group, src), group=group, tag=tag)
    return out


class RecvState(Function):
    """Forward: receive tensors from ``src``. Backward: send their gradients back to ``src``.

    ``anchor`` is an empty tensor that requires grad, so the outputs always join the graph and the
    backward always sends (the sender's :class:`SendState` waits for it).
    """

    @staticmethod
    def forward(ctx, src: int, tag: int, group, anchor: Tensor, *like: Tensor) -> tuple[Tensor, ...]:
        ctx.src, ctx.tag, ctx.group = src, tag, group
        return recv(like, src, group, tag)

    @staticmethod
    def backward(ctx, *grads: Tensor):
        send(tuple(g.contiguous() for g in grads), ctx.src, ctx.group, ctx.tag, "backward")
        return (None, None, None, None) + (None,) * len(grads)


class SendState(Function):
    """Forward: send ``state`` to ``dst`` and pass ``out`` through. Backward: receive the state's
    gradient from ``dst`` (``out``'s gradient is what triggers it: ``out`` must reach the loss)."""

    @staticmethod
    def forward(ctx, dst: int, tag: int, group, out: Tensor, *state: Tensor) -> Tensor:
        ctx.dst, ctx.tag, ctx.group = dst, tag, group
        ctx.like = tuple(torch.empty_like(s, device="meta") for s in state)
        ctx.device = out.device
        send(tuple(s.detach() for s in state), dst, group, tag, "forward")
        return out.clone()

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        like = tuple(torch.empty(s.shape, dtype=s.dtype, device=ctx.device) for s in ctx.like)
        grads = recv(like, ctx.dst, ctx.group, ctx.tag)
        return (None, None, None, grad_out) + grads


class AllGather(Function):
    """``[R, *x.shape]``: every rank's ``x`` stacked in group-rank order. Backward: the sum over ranks
    of the gradient (all-reduce), this rank's slice."""

    @staticmethod
    def forward(ctx, group, x: Tensor) -> Tensor:
        rank, world = group_rank_world(group)
        ctx.group, ctx.rank, ctx.world = group, rank, world
        x = x.contiguous()
        out = [torch.empty_like(x) for _ in range(world)]
        COUNTER.add((world - 1) * _nbytes(x), "forward")
        dist.all_gather(out, x, group=group)
        return torch.stack(out)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous()
        COUNTER.add(2 * (ctx.world - 1) * _nbytes(grad) // ctx.world, "backward")
        dist.all_reduce(grad, group=ctx.group)
        return None, grad[ctx.rank]


class Tie(Function):
    """``out`` unchanged, with ``other`` joined to its graph (zero gradient): the backward of whatever
    made ``other`` (a collective every rank must enter) then runs on this rank too, even when the
    loss does not read it here."""

    @staticmethod
    def forward(ctx, out: Tensor, other: Tensor) -> Tensor:
        ctx.like = torch.empty_like(other, device="meta")
        ctx.device = other.device
        return out.clone()

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        return grad_out, torch.zeros(ctx.like.shape, dtype=ctx.like.dtype, device=ctx.device)


def all_gather(x: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """Differentiable all-gather: ``x [*S]`` on each of R ranks -> ``[R, *S]`` on every rank."""
    return AllGather.apply(group, x)
