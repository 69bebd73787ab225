"""Context parallelism: one sequence split along T over the R ranks of a process group.

Rank r holds tokens ``[r * T_r, (r + 1) * T_r)`` of every sequence (``q, k, v`` are its shards,
``[B, H, T_r, D]``, the same ``T_r`` on every rank) and gets back the output of those tokens, equal to
the matching slice of a one-process call. Three schemes, by what the state of the mixer allows
(derivations: README.md):

- :func:`cp_ttt` (TTT-Linear, TTT-MLP): a relay. Rank r receives rank r-1's final ``TTTState``, runs
  its segment from it and sends its own final state to rank r+1; the backward sends the state's
  gradient from r+1 back to r. With ``micro_batches=M`` the batch is cut in M pieces that flow through
  the ranks one after another, so rank r works on piece m while rank r+1 works on piece m-1.
- :func:`cp_family` (linear attention, DeltaNet, Gated DeltaNet, ...): a scan. The state update of a
  segment is affine in its incoming state, ``S_out = A S_in + B``; every rank computes its own
  ``(A, B)`` and its output's dependence on ``S_in`` in parallel (one op call on augmented values),
  the ``(A, B)`` of all ranks are all-gathered and each rank folds those of the ranks before it
  (an exclusive scan) to get its ``S_in``.
- :func:`cp_attention` (softmax attention, the baseline): keys and values are all-gathered.

Gradients flow through every exchange, so ``loss.backward()`` on every rank gives each rank the
gradient of the sum of all ranks' losses with respect to its own shards. Tensors every rank holds a
copy of (parameters, a learned initial state) get per-rank partial gradients that must be summed over
the group, as data parallelism already does for parameters. Under autograd every rank must call
backward (the relay's backward is a chain of messages).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from ..ops import family as family_ops
from ..ops._dispatch import TTTOutput
from ..ops._state import fresh_state
from ..ops.common import compute_dtype
from ..ops.ttt_linear import api as ttt_linear_api
from ..ops.ttt_mlp import api as ttt_mlp_api
from ..ops.types import TTTState
from .comm import RecvState, SendState, Tie, all_gather, group_rank_world, recv, send

__all__ = [
    "FAMILY_CP_RULES",
    "context_parallel_groups",
    "cp_attention",
    "cp_bytes",
    "cp_family",
    "cp_ttt",
    "disable_context_parallel",
    "enable_context_parallel",
    "restore_context_parallel",
]


# --------------------------------------------------------------------------------------------------
# TTT-Linear / TTT-MLP: the state relay
# --------------------------------------------------------------------------------------------------


def _state_layout(op: Callable, initial_state, H: int, D: int) -> tuple[str, tuple, tuple[str, ...]]:
    name = getattr(op, "__name__", "")
    if name == "ttt_linear":
        return name, ttt_linear_api.state_shapes(H, D), ttt_linear_api.STATE_NAMES
    if name == "ttt_mlp":
        W1 = initial_state.anchor[0] if isinstance(initial_state, TTTState) else initial_state[0]
        return name, ttt_mlp_api.state_shapes(H, D, W1.shape[-1]), ttt_mlp_api.STATE_NAMES
    raise ValueError(f"cp_ttt runs ttt.ops.ttt_linear or ttt.ops.ttt_mlp, got {name or op!r}")


def _wire(state: TTTState) -> tuple[Tensor, ...]:
    """What goes on the wire: the anchor alone at a mini-batch boundary, else anchor, grad_sum, weights."""
    if state.offset == 0:
        return state.anchor
    return state.anchor + state.grad_sum + state.weights


def _unwire(tensors: tuple[Tensor, ...], n: int, offset: int, mbs: int, variant: str) -> TTTState:
    anchor = tensors[:n]
    if offset == 0:
        return TTTState(anchor, anchor, tuple(torch.zeros_like(a) for a in anchor), 0, mbs, variant)
    return TTTState(tensors[2 * n :], anchor, tensors[n : 2 * n], offset, mbs, variant)


def cp_ttt(
    op: Callable[..., TTTOutput],
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lr: Tensor,
    ln_weight: Tensor,
    ln_bias: Tensor,
    *,
    initial_state: tuple[Tensor, ...] | TTTState,
    mini_batch_size: int = 16,
    micro_batches: int = 1,
    output_final_state: bool = False,
    group: dist.ProcessGroup | None = None,
    **kwargs,
) -> TTTOutput:
    """Context-parallel ``ttt_linear`` / ``ttt_mlp``: rank r continues from rank r-1's final state.

    Args:
        op: ``ttt.ops.ttt_linear`` or ``ttt.ops.ttt_mlp``.
        q, k, v: this rank's shard ``[B, H, T_r, D]`` (rank r holds tokens ``r*T_r ... (r+1)*T_r - 1``).
        lr: ``[B, H, T_r]`` shard. ln_weight, ln_bias: ``[H, D]``, the same on every rank.
        initial_state: the state before token 0, as the op takes it; every rank passes it (rank 0
            uses it, the others take their shapes from it).
        mini_batch_size: the op's b; segments need not be multiples of it (the state carries the
            offset inside a mini-batch).
        micro_batches: M; the batch is cut into M pieces that flow through the ranks one after
            another (pipelining). B must be a multiple of M.
        output_final_state: return the state after the whole sequence on the last rank (None on the
            others).
        group: the context-parallel process group. Default: the default group.
        kwargs: the op's other keywords (``token_eta``, ``eps``, ``impl``; ``causal`` must stay True).

    Returns:
        ``TTTOutput(o [B, H, T_r, D], final_state)``: ``o`` equals the slice ``r*T_r ... (r+1)*T_r`` of a
        one-process call on the whole sequence.
    """
    rank, world = group_rank_world(group)
    B, H, T_r, D = q.shape
    if micro_batches < 1 or B % micro_batches:
        raise ValueError(f"micro_batches must divide the batch size B={B}, got {micro_batches}")
    variant, shapes, names = _state_layout(op, initial_state, H, D)
    start = fresh_state(
        initial_state, shapes=shapes, names=names, batch_size=B, mini_batch_size=mini_batch_size,
        variant=variant, dtype=compute_dtype(q.dtype), device=q.device,
    )  # fmt: skip
    offset_in = (rank * T_r + start.offset) % mini_batch_size
    grad = torch.is_grad_enabled()
    anchor = torch.empty(0, device=q.device, requires_grad=True) if grad else None
    m_size = B // micro_batches
    outs, finals = [], []
    for m in range(micro_batches):
        rows = slice(m * m_size, (m + 1) * m_size)
        if rank == 0:
            state = start.rows(rows.start, rows.stop)
        else:
            like = start.rows(rows.start, rows.stop).anchor * (3 if offset_in else 1)  # see _wire
            if grad:
                got = RecvState.apply(rank - 1, m, group, anchor, *like)
            else:
                got = recv(like, rank - 1, group, m)
            state = _unwire(tuple(got), len(names), offset_in, mini_batch_size, variant)
        o, final = op(
            q[rows], k[rows], v[rows], lr[rows], ln_weight, ln_bias,
            initial_state=state, mini_batch_size=mini_batch_size, output_final_state=True, **kwargs,
        )  # fmt: skip
        if rank < world - 1:
            if grad:
                o = SendState.apply(rank + 1, m, group, o, *_wire(final))
            else:
                send(_wire(final), rank + 1, group, m, "forward")
        outs.append(o)
        finals.append(final)
    o = torch.cat(outs) if micro_batches > 1 else outs[0]
    last = output_final_state and rank == world - 1
    return TTTOutput(o, (TTTState.cat(finals) if micro_batches > 1 else finals[0]) if last else None)


# --------------------------------------------------------------------------------------------------
# The linear-attention family: an exclusive scan of affine maps
# --------------------------------------------------------------------------------------------------

# rules whose transition A_t acts on the rows of S the same way for every column (value dim): the
# augmented-value trick below is exact for them. Longhorn's step size is per value column (its A_t
# differs between columns), so it is not in the list.
FAMILY_CP_RULES = tuple(rule for rule in family_ops.__all__ if rule != "longhorn")


def cp_family(
    op: Callable[..., tuple[Tensor, Tensor | None]],
    q: Tensor,
    k: Tensor | None,
    v: Tensor,
    *,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    group: dist.ProcessGroup | None = None,
    **kwargs,
) -> tuple[Tensor, Tensor | None]:
    """Context-parallel family rule (``ttt.ops.family.*``): local affine maps combined by a scan.

    One op call per rank on augmented values ``v' = [0 | v]`` from ``S'_0 = [I | 0]`` gives, for every
    token t of the segment, ``S'_t = [A_t | B_t]`` with ``S_t = A_t S_in + B_t`` for any incoming state
    ``S_in``, and ``o'_t = [A_t^T q~_t | B_t^T q~_t]`` (``q~ = scale q``), so
    ``o_t = S_t^T q~_t = S_in^T (A_t^T q~_t) + B_t^T q~_t``. The segment maps ``(A, B)`` are all-gathered
    and ``S_in`` of rank r is ``A_{r-1}(... (A_0 S_0 + B_0) ...) + B_{r-1}``.

    Args:
        op: a rule of ``ttt.ops.family`` named in ``FAMILY_CP_RULES``.
        q, k, v: this rank's shard ``[B, H, T_r, Dk]`` / ``[B, H, T_r, Dv]`` (``k=None`` for hgrn2).
        initial_state: ``S_0 [B, H, Dk, Dv]`` before token 0, the same on every rank. Default: zeros.
        output_final_state: return ``S_T`` (every rank computes it from the gathered maps).
        group: the context-parallel process group. Default: the default group.
        kwargs: the rule's other arguments; per-token gates are this rank's ``T_r`` shard.

    Returns:
        ``(o [B, H, T_r, Dv] in q.dtype, S_T or None)``.
    """
    name = getattr(op, "__name__", "")
    if name not in FAMILY_CP_RULES:
        raise ValueError(f"cp_family runs one of {', '.join(FAMILY_CP_RULES)}; got {name or op!r}")
    rank, world = group_rank_world(group)
    B, H, T_r, Dk = q.shape
    Dv = v.shape[-1]
    dt = compute_dtype(q.dtype)
    eye = torch.eye(Dk, dtype=dt, device=q.device).expand(B, H, Dk, Dk)
    s_aug = torch.cat([eye, eye.new_zeros(B, H, Dk, Dv)], dim=-1)  # [B, H, Dk, Dk + Dv]
    v_aug = torch.cat([v.new_zeros(B, H, T_r, Dk), v], dim=-1)
    args = (q, v_aug) if k is None else (q, k, v_aug)
    o_aug, s_out = op(*args, initial_state=s_aug, output_final_state=True, **kwargs)
    maps = all_gather(s_out, group)  # [R, B, H, Dk, Dk + Dv]
    state = (
        torch.zeros(B, H, Dk, Dv, dtype=dt, device=q.device)
        if initial_state is None
        else initial_state.to(dt).expand(B, H, Dk, Dv)
    )
    s_in = state
    for r in range(world):
        if r == rank:
            s_in = state
            if not output_final_state:
                break
        state = maps[r, ..., :Dk] @ state + maps[r, ..., Dk:]
    o = o_aug[..., :Dk].to(dt) @ s_in + o_aug[..., Dk:].to(dt)
    if torch.is_grad_enabled() and maps.requires_grad:  # rank 0's o does not read the maps
        o = Tie.apply(o, maps)
    return o.to(q.dtype), (state if output_final_state else None)


# --------------------------------------------------------------------------------------------------
# Softmax attention (the baseline): all-gather keys and values
# --------------------------------------------------------------------------------------------------


def cp_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: float | None = None,
    group: dist.ProcessGroup | None = None,
) -> Tensor:
    """Context-parallel causal softmax attention: every rank all-gathers K and V.

    Args:
        q, k, v: this rank's shard ``[B, H, T_r, D]`` (grouped-query heads already expanded).
        scale: as ``scaled_dot_product_attention``. Default: ``D ** -0.5``.

    Returns:
        ``o [B, H, T_r, D]``, the slice of a one-process causal attention.
    """
    rank, world = group_rank_world(group)
    T_r = q.shape[2]
    kv = all_gather(torch.stack([k, v]), group)  # [R, 2, B, H, T_r, D]
    kv = kv[: rank + 1].movedim(0, -3).flatten(-3, -2)  # [2, B, H, (rank + 1) T_r, D] (later keys unused)
    pos_q = torch.arange(T_r, device=q.device) + rank * T_r
    mask = pos_q[:, None] >= torch.arange(kv.shape[-2], device=q.device)[None, :]
    return F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=mask, scale=scale)


# --------------------------------------------------------------------------------------------------
# Communication volume, analytically (what ttt.distributed.COUNTER counts on the busiest rank)
# --------------------------------------------------------------------------------------------------


def cp_bytes(
    scheme: str,
    *,
    B: int,
    H: int,
    T: int,
    D: int,
    R: int,
    element_size: int,
    state_numel: int | None = None,
    mid_mini_batch: bool = False,
) -> dict[str, int]:
    """Bytes the busiest rank sends in one forward and one backward, ``{"forward": .., "backward": ..}``.

    Args:
        scheme: ``"relay"`` (cp_ttt), ``"scan"`` (cp_family, Dk = Dv = D) or ``"kv"`` (cp_attention).
        B, H, T, D, R: batch, heads, the *whole* sequence length, head dim, ranks (R divides T).
        element_size: bytes per element (8 for float64; the TTT state is float32 for low precision).
        state_numel: relay only: elements of one head's state (TTT-Linear ``D * D + D``; TTT-MLP
            ``2 D M + M + D``).
        mid_mini_batch: relay only: segments end inside a mini-batch (anchor, grad_sum and weights
            travel instead of the anchor alone).
    """
    if R == 1:
        return {"forward": 0, "backward": 0}
    if scheme == "relay":
        if state_numel is None:
            raise ValueError("scheme='relay' needs state_numel (elements of one head's state)")
        n = B * H * state_numel * element_size * (3 if mid_mini_batch else 1)
        return {"forward": n, "backward": n}
    if scheme == "scan":
        slab = B * H * D * 2 * D * element_size  # [A | B], Dk x (Dk + Dv)
        return {"forward": (R - 1) * slab, "backward": 2 * (R - 1) * slab}
    if scheme == "kv":
        slab = 2 * B * H * (T // R) * D * element_size
        return {"forward": (R - 1) * slab, "backward": 2 * (R - 1) * slab}
    raise ValueError(f"scheme must be 'relay', 'scan' or 'kv', got {scheme!r}")


# --------------------------------------------------------------------------------------------------
# Layers and models
# --------------------------------------------------------------------------------------------------


def enable_context_parallel(
    model: torch.nn.Module, group: dist.ProcessGroup | None = None, *, micro_batches: int = 1
) -> torch.nn.Module:
    """Split the sequence over the ranks of ``group`` in every TTT layer of ``model`` (in place).

    After this call rank r feeds the model its shard ``x [B, T_r, C]`` (tokens ``r*T_r ...``), every
    ``TTTLinear`` / ``TTTMLP`` relays its fast weights through :func:`cp_ttt` and offsets its RoPE
    positions by ``r * T_r``; per-token modules (embeddings, MLPs, norms, the head) need nothing. Calls
    start from the learned initial state (``state=None``). Parameter gradients are per-rank partial sums:
    all-reduce them over ``group`` (sum) before the optimizer step. ``micro_batches``: :func:`cp_ttt`'s
    pipelining (it must divide the batch size of every call).

    Raises:
        ValueError: for a mixer without a context-parallel layer form yet (attention, the family
            layers) or a TTT layer whose short convolutions (``share_qk=True``) would need the previous
            rank's last tokens.
    """
    from ttt.layers import MIXERS, TTTMLP, TTTLinear

    others = tuple(c for c in MIXERS.values() if c not in (TTTLinear, TTTMLP))
    layers = []
    for name, module in model.named_modules():
        if isinstance(module, (TTTLinear, TTTMLP)):
            if module.share_qk:
                raise ValueError(
                    f"{name or 'model'}: share_qk=True (short convolutions) has no context-parallel form"
                )
            if not module.causal:
                raise ValueError(f"{name or 'model'}: causal=False has no context-parallel form")
            layers.append(module)
        elif isinstance(module, others):
            raise ValueError(
                f"{name or 'model'} ({type(module).__name__}) has no context-parallel layer form yet; "
                "TTTLinear and TTTMLP have"
            )
    rank, _ = group_rank_world(group)
    for module in layers:
        module.context_parallel = (group, rank, micro_batches)
    return model


def disable_context_parallel(model: torch.nn.Module) -> list[tuple[torch.nn.Module, tuple]]:
    """Turn context parallelism off in every TTT layer of ``model``; returns what to give back to
    :func:`restore_context_parallel` (e.g. around a validation pass on whole sequences)."""
    saved = [(m, m.context_parallel) for m in model.modules() if getattr(m, "context_parallel", None)]
    for m, _ in saved:
        m.context_parallel = None
    return saved


def restore_context_parallel(saved: list[tuple[torch.nn.Module, tuple]]) -> None:
    for m, setting in saved:
        m.context_parallel = setting


def context_parallel_groups(size: int) -> tuple[dist.ProcessGroup, int, int, int]:
    """Cut the default group into consecutive blocks of ``size`` ranks (each block shares one sequence).

    Returns:
        ``(group of this rank's block, rank inside it, data-parallel index = block index, block count)``.
    """
    rank, world = group_rank_world(None)
    if size < 1 or world % size:
        raise ValueError(
            f"context parallelism over {size} ranks needs a multiple of {size} processes, got {world}"
        )
    mine = None
    for g in range(world // size):  # every rank creates every group, in the same order
        group = dist.new_group(list(range(g * size, (g + 1) * size)))
        if g == rank // size:
            mine = group
    return mine, rank % size, rank // size, world // size
