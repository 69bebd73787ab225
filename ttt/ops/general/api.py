"""The general TTT operator: any inner model, any inner loss, inner gradient from ``torch.func``.

Per head, with the fast weights ``P0`` at the start of a mini-batch of size b and velocity ``m``
(zero at the start of the sequence):

    Delta_i = token_eta[i] * sum_{j <= i} lr_j * grad loss(f_P(k_j), k_j, v_j) at P0     (one step)
    U_i     = momentum * m + sign * Delta_i,  sign = -1 for gradient ascent
    P_i     = (1 - weight_decay) * P0 - U_i   (parameters outside ``update`` stay at P0)
    o_i     = readout(P_i, q_i)               (causal; non-causal reads P of the mini-batch's last token)

With ``inner_steps = n > 1``, ``Delta_i = P0 - P^n`` where ``P^{s+1} = P^s - token_eta[i] * sum_{j <= i}
lr_j grad loss_j(P^s)``. The next mini-batch starts from ``P_last`` with ``m = U_last``. It is the
oracle of the fast paths and the tool of the ablations; it is slow by design (explicit per-token
weights).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import _checks
from .._dispatch import TTTOutput
from ..common import compute_dtype, default_token_eta, split_segments
from ..types import TTTState
from .inner import LOSSES


def ttt_general(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    model: Callable[[tuple[Tensor, ...], Tensor], Tensor],
    initial_state: tuple[Tensor, ...] | TTTState,
    loss: str | Callable[..., Tensor] = "mse",
    readout: Callable[..., Tensor] | None = None,
    head_args: tuple[Tensor, ...] = (),
    lr: Tensor | float = 1.0,
    mini_batch_size: int = 1,
    token_eta: Tensor | None = None,
    causal: bool = True,
    inner_steps: int = 1,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    ascent: bool = False,
    update: Sequence[bool] | None = None,
    weight_norm: bool = False,
    output_final_state: bool = False,
) -> TTTOutput:
    """Test-time training with an arbitrary inner model, loss and inner-loop options.

    Args:
        q, k: ``[B, H, T, Dk]``; v: ``[B, H, T, Dv]``.
        model: ``f(params, x [Dk]) -> [Dout]`` for one head and one token (see ``ttt.ops.general.inner``).
        initial_state: fast weights, each ``[B, H, *shape]`` or ``[1, H, *shape]``, or a previous state.
        loss: "mse" (``0.5||f(k) - v||^2``), "dot" (``-<f(k), v>``) or ``loss(pred, k, v, *head_args)``.
        readout: ``readout(params, q, *head_args) -> [Dv]``. Default: ``f(params, q)``.
        head_args: per-head tensors ``[H, ...]`` passed to ``loss`` and ``readout`` (e.g. LN params).
        lr: ``[B, H, T]`` per-token inner learning rate, or a constant.
        mini_batch_size: b; all gradients of a mini-batch are taken at its starting weights. Default 1.
        token_eta: ``[b]``. Default ``1 / (i + 1)``.
        causal: False: every query of a mini-batch reads the weights after the whole mini-batch.
        inner_steps: gradient steps per token prefix. Default 1.
        momentum: factor on the previous mini-batch's update. Default 0.
        weight_decay: shrink ``P0`` by ``1 - weight_decay`` per mini-batch. Default 0.
        ascent: gradient ascent instead of descent (an ablation of Liu et al. 2026).
        update: one bool per parameter tensor: which are trained (e.g. last layer only). Default all.
        weight_norm: after every update, rescale each output unit's weight vector (each column of a
            ``[Din, Dout]`` matrix) of the updated matrices back to its norm at the mini-batch start, as
            LaCT does (so the norms of the initial state are kept). Default False.
        output_final_state: also return the ``TTTState``.

    Returns:
        ``TTTOutput(output [B, H, T, Dv] in q's dtype, final_state or None)``.
    """
    B, H, T, Dk = _checks.check_qkv(q, k, v, same_qk_v_dim=False)
    b, cd, N = mini_batch_size, compute_dtype(q.dtype), B * H
    lr, te, loss_fn = _check_options(q, lr, b, token_eta, inner_steps, loss, cd)
    momentum = _checks.check_coefficient("momentum", momentum, high_open=True)
    weight_decay = _checks.check_coefficient("weight_decay", weight_decay, high_open=False)

    P0, S, m, offset = _initial(initial_state, B, H, b, cd, q.device)
    if offset and (not causal or inner_steps > 1):
        raise ValueError("causal=False and inner_steps > 1 can only resume at a mini-batch boundary")
    mask = _update_mask(update, len(P0))
    m = m or (tuple(torch.zeros_like(p) for p in P0) if momentum else ())
    args = tuple(a.to(cd)[None].expand(B, *a.shape).reshape(N, *a.shape[1:]) for a in head_args)
    qf, kf, vf, lrf = (x.to(cd).reshape(N, T, *x.shape[3:]) for x in (q, k, v, lr))

    token_grads, per_token_read = _batched(model, loss_fn, readout, len(args))
    opts = _Options(inner_steps, momentum, weight_decay, -1.0 if ascent else 1.0, mask, weight_norm, causal)
    outs, P_last = [], P0
    for start, c in split_segments(T, offset, b):
        sl = slice(start, start + c)
        K, V, LR, te_c = kf[:, sl], vf[:, sl], lrf[:, sl], te[offset : offset + c]
        P, U, prefix = _segment(opts, token_grads, P0, S, m, K, V, LR, te_c, args)
        outs.append(per_token_read(P, qf[:, sl], *args))
        S = tuple(p[:, -1] for p in prefix)
        P_last = tuple(p[:, -1] for p in P)
        offset += c
        if offset == b:
            P0, offset = P_last, 0
            S = tuple(torch.zeros_like(s) for s in S)
            m = tuple(u[:, -1] for u in U) if momentum else m

    o = torch.cat(outs, dim=1).reshape(B, H, T, -1) if outs else q.new_zeros(B, H, 0, v.shape[-1]).to(cd)
    unflat = lambda ts: tuple(t.reshape(B, H, *t.shape[1:]) for t in ts)  # noqa: E731
    final = TTTState(unflat(P_last), unflat(P0), unflat(S), offset, b, "general", unflat(m))
    return TTTOutput(o.to(q.dtype), final if output_final_state else None)


def _check_options(q: Tensor, lr, b: int, token_eta, inner_steps, loss, cd):
    """The checked per-token ``lr [B, H, T]``, ``token_eta [b]`` (compute dtype) and loss function."""
    B, H, T = q.shape[:3]
    _checks.check_mini_batch_size(b)
    lr = _checks.check_lr(lr, B, H, T, q.device)  # >= 0: gradient ascent is ascent=True
    te = (default_token_eta(b, q.device) if token_eta is None else token_eta).to(cd)
    _checks.check_token_eta(te, b, q.device)
    if not isinstance(inner_steps, int) or inner_steps < 1:
        raise ValueError(f"inner_steps must be a positive int, got {inner_steps!r}")
    loss_fn = LOSSES[loss] if isinstance(loss, str) and loss in LOSSES else loss
    if not callable(loss_fn):
        raise ValueError(f"loss must be one of {sorted(LOSSES)} or a callable, got {loss!r}")
    return lr, te, loss_fn


def _batched(model, loss_fn, readout, n_args: int):
    """The per-token inner gradients and readouts, vmapped over (sequence x head) and tokens."""
    read = readout if readout is not None else (lambda params, x, *args: model(params, x))

    def token_loss(params, k_t, v_t, *a):
        return loss_fn(model(params, k_t), k_t, v_t, *a)

    over_tokens = (None, 0, 0) + (None,) * n_args
    token_grads = torch.func.vmap(torch.func.vmap(torch.func.grad(token_loss), in_dims=over_tokens))
    return token_grads, torch.func.vmap(torch.func.vmap(read, in_dims=(0, 0) + (None,) * n_args))


@dataclass(frozen=True)
class _Options:
    inner_steps: int
    momentum: float
    weight_decay: float
    sign: float  # -1 for gradient ascent
    mask: tuple[bool, ...]  # which fast-weight tensors are trained
    weight_norm: bool
    causal: bool


def _segment(opts: _Options, token_grads, P0, S, m, K, V, LR, te_c, args):
    """One stretch of c tokens inside a mini-batch that started at ``P0`` (gradient sums ``S``, momentum
    ``m`` carried in): the weights each token reads ``P``, the updates ``U`` and the gradient prefix sums,
    each ``[N, c, *shape]``."""
    N, c = K.shape[:2]
    g = token_grads(P0, K, V, *args)  # each [N, c, *shape]
    prefix = tuple(s[:, None] + torch.cumsum(bcast(LR, gi) * gi, dim=1) for s, gi in zip(S, g))
    if opts.inner_steps == 1:
        delta = tuple(bcast(te_c[None].expand(N, c), p) * p for p in prefix)
    else:
        delta = _multi_step(token_grads, P0, K, V, LR, te_c, args, opts.inner_steps, opts.mask)
    delta = tuple(opts.sign * d if upd else torch.zeros_like(d) for d, upd in zip(delta, opts.mask))
    U = tuple(d + opts.momentum * mi[:, None] for d, mi in zip(delta, m)) if opts.momentum else delta
    P = tuple((1 - opts.weight_decay) * p0[:, None] - u for p0, u in zip(P0, U))
    if opts.weight_norm:
        P = tuple(_renorm(p, p0) if upd and p.dim() >= 4 else p for p, p0, upd in zip(P, P0, opts.mask))
    if not opts.causal:
        P = tuple(p[:, -1:].expand_as(p) for p in P)
    return P, U, prefix


def bcast(x: Tensor, like: Tensor) -> Tensor:
    """``x [N, c]`` -> ``[N, c, 1, ..., 1]`` to scale a per-token gradient like ``like``."""
    return x.reshape(*x.shape, *([1] * (like.dim() - 2)))


def _renorm(p: Tensor, p0: Tensor) -> Tensor:
    """Columns of ``p [N, c, Din, Dout]`` rescaled to the column norms of ``p0 [N, Din, Dout]``."""
    return p * (p0.norm(dim=-2, keepdim=True)[:, None] / p.norm(dim=-2, keepdim=True).clamp_min(1e-12))


def _multi_step(token_grads, P0, K, V, LR, te_c, args, steps, mask):
    """``P0 - P^n`` for every token prefix i of the segment, n gradient steps on tokens ``<= i``.

    Frozen parameters (``mask`` False) stay at ``P0`` during the steps, not only after them.
    """
    deltas = []
    for i in range(K.shape[1]):
        P = P0
        for _ in range(steps):
            g = token_grads(P, K[:, : i + 1], V[:, : i + 1], *args)
            P = tuple(
                p - te_c[i] * (bcast(LR[:, : i + 1], gi) * gi).sum(1) if upd else p
                for p, gi, upd in zip(P, g, mask)
            )
        deltas.append(tuple(p0 - p for p0, p in zip(P0, P)))
    return tuple(torch.stack(ds, dim=1) for ds in zip(*deltas))


def _update_mask(update: Sequence[bool] | None, n: int) -> tuple[bool, ...]:
    """Which of the ``n`` fast-weight tensors the inner loop trains (all by default)."""
    mask = tuple(update) if update is not None else (True,) * n
    if len(mask) != n:
        raise ValueError(f"update must hold one bool per fast-weight tensor ({n}), got {len(mask)}")
    return mask


def _initial(initial_state, B, H, b, cd, device):
    """Flatten ``[B|1, H, *shape]`` fast weights (or a previous state) to ``[B*H, *shape]``."""
    flat = lambda t: t.to(cd).expand(B, *t.shape[1:]).reshape(B * H, *t.shape[2:])  # noqa: E731
    if isinstance(initial_state, TTTState):
        st = initial_state
        if st.variant != "general" or st.mini_batch_size != b:
            raise ValueError(
                f"initial_state comes from {st.variant!r} with mini_batch_size={st.mini_batch_size}; "
                f"expected a 'general' state with mini_batch_size={b}"
            )
        return (tuple(map(flat, st.anchor)), tuple(map(flat, st.grad_sum)), tuple(map(flat, st.velocity)),
                st.offset)  # fmt: skip
    if not isinstance(initial_state, (tuple, list)) or not initial_state:
        raise TypeError("initial_state must be a non-empty tuple of fast weights [B|1, H, ...] or a TTTState")
    for i, t in enumerate(initial_state):
        if not isinstance(t, Tensor) or t.dim() < 2 or t.shape[0] not in (1, B) or t.shape[1] != H:
            got = list(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"initial_state[{i}] must have shape [B or 1, H={H}, ...] (B={B}), got {got}")
        if t.device != device:
            raise ValueError(f"initial_state[{i}] must be on {device}, got {t.device}")
    P0 = tuple(map(flat, initial_state))
    return P0, tuple(torch.zeros_like(p) for p in P0), (), 0
