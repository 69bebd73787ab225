"""``ttt.attention``: TTT as a drop-in for ``scaled_dot_product_attention`` (same order and shapes).

Per head, the fast weight is a matrix ``S [Dk, Dv]`` with ``S_0 = 0``; token j's inner loss is
``0.5 * ||S^T k_j - v_j||^2``; token i of a mini-batch reads
``S_i = S_0 - token_eta[i] * sum_{j <= i} lr_j * k_j (S_0^T k_j - v_j)^T`` (its own update included)
and outputs ``o_i = S_i^T (scale * q_i)``. Then:

- ``mini_batch_size=1`` is online gradient descent, i.e. the delta rule (DeltaNet with beta = lr);
- ``mini_batch_size >= T`` with ``S_0 = 0`` takes every gradient at ``S = 0``, where it is ``-k_j v_j^T``,
  so ``o_i = scale * sum_{j <= i} lr_j (q_i . k_j) v_j``: causal linear attention (Sun et al. Thm 1);
- in between, mini-batch GD interpolates: linear attention inside a mini-batch, delta-rule corrections
  across mini-batches. ``token_eta`` defaults to ones here (a plain sum), so the limits above are exact.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import _checks
from .._dispatch import TTTOutput
from .._state import fresh_state, last_token_weights
from ..common import causal_eta_scores, compute_dtype, scan_mini_batches, split_segments, split_time
from ..family import deltanet
from ..family._validate import check_gate
from ..forms import Form, register_form, resolve
from ..general import inner, ttt_general
from ..types import Impl, TTTState


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    lr: Tensor | float,
    mini_batch_size: int = 1,
    is_causal: bool = True,
    scale: float | None = None,
    inner_model: str = "linear",
    token_eta: Tensor | None = None,
    initial_state: Tensor | TTTState | None = None,
    output_final_state: bool = False,
    impl: Impl | str = Impl.CHUNK,
) -> Tensor | TTTOutput:
    """TTT attention: answer each query with a linear model trained on the (k, v) pairs so far.

    Args:
        q, k: ``[B, H, T, Dk]``; v: ``[B, H, T, Dv]`` (as SDPA).
        lr: inner learning rate, a constant or ``[B, H, T]`` (DeltaNet's beta; >= 0 at
            ``mini_batch_size=1``, which runs the chunkwise-parallel delta rule of ``ttt.ops.deltanet``).
        mini_batch_size: gradients of a mini-batch are all taken at its starting weights. Default 1.
        is_causal: False: each query reads the weights after its whole mini-batch (with
            ``mini_batch_size >= T``: non-causal linear attention).
        scale: query scale. Default ``1 / sqrt(Dk)`` as SDPA.
        inner_model: only ``"linear"`` (``f(x) = S^T x``); other inner models: ``ttt.ops.ttt_general``.
        token_eta: ``[mini_batch_size]``. Default ones.
        initial_state: ``S_0`` ``[B or 1, H, Dk, Dv]`` or a previous ``TTTState``. Default zeros.
        output_final_state: return ``TTTOutput(o, state)`` instead of the tensor ``o``.
        impl: "chunk" (default) or "reference" (the general operator, autograd inner gradient).

    Returns:
        ``o`` ``[B, H, T, Dv]`` in q's dtype (or ``TTTOutput`` with ``output_final_state=True``).

    Examples::

        >>> import torch, ttt
        >>> q, k, v = (torch.randn(2, 4, 64, 32) for _ in range(3))
        >>> o = ttt.attention(q, k, v, lr=0.5)   # the delta rule
        >>> o.shape
        torch.Size([2, 4, 64, 32])
    """
    B, H, T, Dk = _checks.check_qkv(q, k, v, same_qk_v_dim=False)
    Dv, cd, b = v.shape[-1], compute_dtype(q.dtype), mini_batch_size
    _checks.check_mini_batch_size(b)
    if inner_model != "linear":
        raise ValueError(
            f"inner_model must be 'linear' (use ttt.ops.ttt_general for others), got {inner_model!r}"
        )
    if isinstance(lr, Tensor):
        _checks.check_per_token("lr", lr, B, H, T, q.device)
    else:
        lr = torch.full((B, H, T), float(lr), device=q.device, dtype=cd)
    te = torch.ones(b, device=q.device, dtype=cd) if token_eta is None else token_eta.to(cd)
    _checks.check_token_eta(te, b, q.device)
    scale = 1.0 / math.sqrt(Dk) if scale is None else scale
    if initial_state is None:
        initial_state = q.new_zeros(1, H, Dk, Dv, dtype=cd)
    if isinstance(initial_state, Tensor):
        initial_state = (initial_state,)
    form = resolve("ttt_attention", impl, q, causal=is_causal).load()
    state = fresh_state(
        initial_state, shapes=((H, Dk, Dv),), names=("S",), batch_size=B, mini_batch_size=b,
        variant="general", dtype=cd, device=q.device,
    )  # fmt: skip
    if not is_causal and state.offset:
        raise ValueError("is_causal=False can only resume at a mini-batch boundary")
    with torch.autocast(q.device.type, enabled=False):  # the fast weight S stays float32
        o, state = form(q, k, v, lr, te, state, is_causal, scale, cd)
    return TTTOutput(o.to(q.dtype), state) if output_final_state else o.to(q.dtype)


def _reference(q, k, v, lr, te, state, causal, scale, cd):
    def read(params, x):
        return inner.linear_no_bias(params, scale * x)

    return ttt_general(
        q, k, v, model=inner.linear_no_bias, initial_state=state, loss="mse", readout=read, lr=lr,
        mini_batch_size=state.mini_batch_size, token_eta=te, causal=causal, output_final_state=True,
    )  # fmt: skip


def _chunk(q, k, v, lr, te, state, causal, scale, cd):
    b = state.mini_batch_size
    if b == 1:  # online GD is the delta rule: use its chunkwise-parallel (WY) form
        # its rate beta = lr * token_eta[0] must be >= 0: check the arguments under the caller's names
        lr = check_gate("lr", lr, tuple(lr.shape), cd, low=0.0)
        if not bool(te[0] >= 0):
            raise ValueError(f"token_eta[0] must be >= 0 at mini_batch_size=1, got {te[0].item()!r}")
        return _delta_rule(q, k, v, lr * te[0], state, scale, cd)
    B, H, T, Dk = q.shape
    segments = split_segments(T, state.offset, b)
    qs, ks, vs, lrs = (split_time(x.to(cd), segments) for x in (q * scale, k, v, lr[..., None]))

    def step(start, c, off, anchor, grad_sum):
        (S,), (prev,) = anchor, grad_sum
        Q, K, V, LR, te_c = qs[start], ks[start], vs[start], lrs[start][..., 0], te[off : off + c]
        G = K @ S - V  # [B, H, c, Dv]: gradient of the loss w.r.t. the prediction
        new = prev + K.transpose(-1, -2) @ (LR[..., None] * G)
        if causal:
            A = causal_eta_scores(Q, K, LR, te_c, bias=False)
            o = Q @ S - te_c[:, None] * (Q @ prev) - A @ G
        else:
            o = Q @ (S - te_c[-1] * new)
        return o, (new,)

    outs, anchor, grad_sum, offset = scan_mini_batches(
        step, state.anchor, state.grad_sum, state.offset, T, te, b
    )
    o = torch.cat(outs, dim=2) if outs else v.new_zeros(B, H, 0, v.shape[-1])
    weights = last_token_weights(anchor, grad_sum, offset, te)
    return o, TTTState(weights, anchor, grad_sum, offset, b, "general")


def _delta_rule(q, k, v, beta, state, scale, cd):
    # at mini-batch 1 every state sits at offset 0: the anchor is the whole state
    q, k, v, beta = (x.to(cd) for x in (q, k, v, beta))
    o, S = deltanet(q, k, v, beta=beta, scale=scale, initial_state=state.anchor[0], output_final_state=True)
    return o, TTTState((S,), (S,), (torch.zeros_like(S),), 0, 1, "general")


register_form("ttt_attention", Form("chunk", _chunk))
register_form("ttt_attention", Form("reference", _reference, auto=False))
