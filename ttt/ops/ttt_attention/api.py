"""``ttt.attention``: TTT as a drop-in for ``torch.nn.functional.scaled_dot_product_attention``.

It takes SDPA's call as it is (``q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa``) and
answers each query with a linear model trained on the (key, value) pairs it may see.

Per head, the fast weight is a matrix ``S [Dk, Dv]`` with ``S_0 = 0``; token j's inner loss is
``0.5 * ||S^T k_j - v_j||^2``; token i of a mini-batch reads
``S_i = S_0 - token_eta[i] * sum_{j <= i} lr_j * k_j (S_0^T k_j - v_j)^T`` (its own update included)
and outputs ``o_i = S_i^T (scale * q_i)``. Then:

- ``mini_batch_size=1`` is online gradient descent, i.e. the delta rule (DeltaNet with beta = lr);
- ``mini_batch_size >= T`` with ``S_0 = 0`` takes every gradient at ``S = 0``, where it is ``-k_j v_j^T``,
  so ``o_i = scale * sum_{j <= i} lr_j (q_i . k_j) v_j``: causal linear attention (Sun et al. Thm 1);
- in between, mini-batch GD interpolates: linear attention inside a mini-batch, delta-rule corrections
  across mini-batches. ``token_eta`` defaults to ones here (a plain sum), so the limits above are exact.

Stability: by default the keys are L2-normalised (``normalize=True``) and ``lr = 1 / mini_batch_size``.
One mini-batch then multiplies ``S`` by ``I - sum_j lr_j k_j k_j^T``, whose eigenvalues lie in
``[1 - sum_j lr_j, 1]`` for unit keys: with ``sum_j lr_j <= 2`` over every mini-batch the weights stay
bounded on any inputs, at any length. Raw keys (``normalize=False``) have no such bound:
``lr * |k|^2 > 2`` diverges (``randn`` keys of width 32 at ``lr = 0.5`` reach 1e33 by T = 100).

What a query may see follows SDPA: ``is_causal=True`` reads the model trained on the keys up to the
query's own (the delta rule by default); ``is_causal=False`` (SDPA's default) lets every query see every
key: its default mini-batch is the whole sequence, which is non-causal linear attention
``o_i = scale * mean_j (q_i . k_j) v_j`` over the keys that take part.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _checks
from .._dispatch import TTTOutput
from .._state import fresh_state, last_token_weights
from ..common import causal_eta_scores, compute_dtype, scan_mini_batches, split_segments, split_time
from ..family import deltanet
from ..forms import Form, register_form, resolve
from ..general import inner, ttt_general
from ..types import Impl, TTTState


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    lr: Tensor | float | None = None,
    normalize: bool = True,
    mini_batch_size: int | None = None,
    inner_model: str = "linear",
    token_eta: Tensor | None = None,
    initial_state: Tensor | TTTState | None = None,
    output_final_state: bool = False,
    impl: Impl | str = Impl.CHUNK,
) -> Tensor | TTTOutput:
    """TTT attention: answer each query with a linear model trained on the (k, v) pairs it may see.

    The positional arguments and their defaults are SDPA's, and so is what a query may see (module
    docstring: ``is_causal=False`` is non-causal linear attention by default, ``True`` the delta rule).

    Args:
        q, k: ``[B, H, T, Dk]``; v: ``[B, H, T, Dv]`` (as SDPA; ``[N, T, D]`` is read as ``B = 1``);
            self-attention only (q and k of one length T).
        attn_mask: boolean, broadcastable to ``[B, H, T, T]``, True = the key takes part. It must mark
            keys (the same for every query, e.g. a padding mask ``[B, 1, 1, T]``), optionally
            combined with the causal triangle (then the call is causal). Masked keys get learning
            rate 0: the model never learns them. With right padding, and at mini-batch 1 with any
            padding, each row's outputs equal those of its unpadded sequence. Float (additive)
            masks and per-query key sets are refused: a learned model has no scores to bias.
        dropout_p: must be 0 (there are no attention weights to drop).
        is_causal: see above. Default False, as SDPA.
        scale: query scale. Default ``1 / sqrt(Dk)`` as SDPA.
        enable_gqa: k, v may have fewer heads than q, each shared by ``H / H_kv`` query heads, as SDPA.
        lr: inner learning rate, a constant or ``[B, H, T]``, finite and >= 0. Default
            ``1 / mini_batch_size`` (``1 / #keys taking part`` for the default non-causal call): stable
            for unit keys (module docstring); at mini-batch 1 it stores each new pair exactly.
        normalize: L2-normalise the keys over Dk before they enter the inner loop (default True: the
            stable rule). ``normalize=False`` runs the unnormalised rule on the keys as given.
        mini_batch_size: gradients of a mini-batch are all taken at its starting weights. Default: 1 (the
            delta rule) when causal, T when not (``is_causal=False`` at mini-batch 1 is refused).
        inner_model: only ``"linear"`` (``f(x) = S^T x``); other inner models: ``ttt.ops.ttt_general``.
        token_eta: ``[mini_batch_size]``. Default ones. initial_state: ``S_0`` ``[B or 1, H, Dk, Dv]`` or a
            previous ``TTTState``. Default zeros.
        output_final_state: return ``TTTOutput(o, state)`` instead of the tensor ``o``.
        impl: "chunk" (default) or "reference" (the general operator, autograd inner gradient).

    Returns:
        ``o`` ``[B, H, T, Dv]`` in q's dtype (or ``TTTOutput`` with ``output_final_state=True``).

    Examples::

        >>> import torch, ttt
        >>> q, k, v = (torch.randn(2, 4, 64, 32) for _ in range(3))
        >>> o = ttt.attention(q, k, v, is_causal=True)   # the delta rule on unit keys, lr = 1
        >>> o.shape
        torch.Size([2, 4, 64, 32])
    """
    _refuse_unsupported(dropout_p, inner_model)
    q, k, v, attn_mask = _as_4d(q, k, v, attn_mask)
    if enable_gqa:
        k, v = _share_kv_heads(q, k, v)
    B, H, T, Dk = _checks.check_qkv(q, k, v, same_qk_v_dim=False)
    Dv, cd = v.shape[-1], compute_dtype(q.dtype)
    keys, is_causal = _key_mask(attn_mask, B, H, T, is_causal)
    b = _mini_batch_size(mini_batch_size, initial_state, is_causal, T)
    lr = _inner_lr(lr, b, keys, mini_batch_size is None and not is_causal, B, H, T, q.device, cd)
    te = torch.ones(b, device=q.device, dtype=cd) if token_eta is None else token_eta.to(cd)
    _checks.check_token_eta(te, b, q.device)
    scale = _checks.resolve_scale(scale, Dk)
    if normalize:
        k = F.normalize(k.to(cd), dim=-1)
    form = resolve("ttt_attention", impl, q, causal=is_causal).load()
    state = _initial_state(initial_state, q, B, H, Dk, Dv, b, is_causal, cd)
    with torch.autocast(q.device.type, enabled=False):  # the fast weight S stays float32
        o, state = form(q, k, v, lr, te, state, is_causal, scale, cd)
    return TTTOutput(o.to(q.dtype), state) if output_final_state else o.to(q.dtype)


def _refuse_unsupported(dropout_p: float, inner_model: str) -> None:
    if not (isinstance(dropout_p, (int, float)) and dropout_p == 0):
        raise ValueError(
            f"dropout_p must be 0 (ttt.attention has no attention weights to drop), got {dropout_p!r}"
        )
    if inner_model != "linear":
        raise ValueError(
            f"inner_model must be 'linear' (use ttt.ops.ttt_general for others), got {inner_model!r}"
        )


def _inner_lr(lr, b: int, keys: Tensor | None, whole_sequence: bool, B, H, T, device, cd) -> Tensor:
    """``lr [B, H, T]`` in the compute dtype: the default or the given one, checked (finite, >= 0 at every
    mini-batch size), 0 on masked keys."""
    if lr is None:
        lr = _default_lr(b, keys, whole_sequence, B, H, T, device, cd)
    lr = _checks.check_lr(lr, B, H, T, device, cd).to(cd)
    return lr * keys if keys is not None else lr


def _initial_state(initial_state, q: Tensor, B, H, Dk, Dv, b: int, causal: bool, cd) -> TTTState:
    """The starting ``TTTState`` of ``S [B, H, Dk, Dv]`` (zeros by default)."""
    if initial_state is None:
        initial_state = q.new_zeros(1, H, Dk, Dv, dtype=cd)
    if isinstance(initial_state, Tensor):
        initial_state = (initial_state,)
    state = fresh_state(
        initial_state, shapes=((H, Dk, Dv),), names=("S",), batch_size=B, mini_batch_size=b,
        variant="general", dtype=cd, device=q.device,
    )  # fmt: skip
    if not causal and state.offset:
        raise ValueError("is_causal=False can only resume at a mini-batch boundary")
    return state


def _as_4d(q, k, v, attn_mask):
    """SDPA also takes ``[N, T, D]``: read it as one batch of N heads."""
    if all(isinstance(x, Tensor) and x.dim() == 3 for x in (q, k, v)):
        return q[None], k[None], v[None], attn_mask
    return q, k, v, attn_mask


def _share_kv_heads(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """GQA as SDPA: query head h reads key/value head ``h // (H / H_kv)``."""
    H, H_kv = q.shape[-3], k.shape[-3]
    if H_kv < 1 or H % H_kv or v.shape[-3] != H_kv:
        raise ValueError(
            f"enable_gqa=True needs k and v with one head count dividing q's ({H}), "
            f"got {k.shape[-3]} and {v.shape[-3]}"
        )
    return k.repeat_interleave(H // H_kv, dim=-3), v.repeat_interleave(H // H_kv, dim=-3)


def _key_mask(attn_mask: Tensor | None, B: int, H: int, T: int, causal: bool) -> tuple[Tensor | None, bool]:
    """``[B, H, T]`` float (1 = the key takes part) from SDPA's boolean ``attn_mask``, and whether the
    call is causal (a mask holding the causal triangle makes it so)."""
    if attn_mask is None:
        return None, causal
    if not isinstance(attn_mask, Tensor) or attn_mask.dtype != torch.bool:
        got = attn_mask.dtype if isinstance(attn_mask, Tensor) else type(attn_mask).__name__
        raise TypeError(
            f"attn_mask must be a boolean tensor (True = the key takes part), got {got}: an additive "
            "float mask biases attention scores, and a learned model has none"
        )
    try:
        full = torch.broadcast_shapes(attn_mask.shape, (B, H, T, T)) == (B, H, T, T)
    except RuntimeError:
        full = False
    if not full or attn_mask.dim() > 4:
        raise ValueError(
            f"attn_mask must broadcast to [B, H, T, T] = {[B, H, T, T]}, got {list(attn_mask.shape)}"
        )
    if T == 0:
        return None, causal
    keys = attn_mask if attn_mask.dim() == 1 else attn_mask[..., -1, :]  # the last query may see every key
    if attn_mask.dim() >= 2 and attn_mask.shape[-2] > 1:
        tri = torch.ones(T, T, dtype=torch.bool, device=attn_mask.device).tril()
        if torch.equal(attn_mask, (keys[..., None, :] & tri).expand_as(attn_mask)):
            causal = True
        elif not torch.equal(attn_mask, keys[..., None, :].expand_as(attn_mask)):
            raise ValueError(
                "attn_mask must mark keys, the same for every query (a padding mask [B, 1, 1, T]), "
                "optionally with the causal triangle: ttt.attention learns the keys in order and cannot "
                "give each query its own set of keys"
            )
    return keys.expand(B, H, T).float(), causal


def _mini_batch_size(b: int | None, initial_state, causal: bool, T: int) -> int:
    if b is None:
        if isinstance(initial_state, TTTState):
            return initial_state.mini_batch_size
        return 1 if causal else max(T, 1)
    _checks.check_mini_batch_size(b)
    if b == 1 and not causal:
        raise ValueError(
            "is_causal=False with mini_batch_size=1 reads each query's weights right after its own key, "
            "which is causal: leave mini_batch_size=None (the whole sequence) so every query sees every key"
        )
    return b


def _default_lr(b, keys, whole_sequence, B, H, T, device, cd) -> Tensor:
    """``1 / b``; over a whole non-causal sequence ``1 / #keys taking part``, so padding changes nothing."""
    if whole_sequence and keys is not None:
        return (1.0 / keys.to(cd).sum(-1, keepdim=True).clamp(min=1)).expand(B, H, T)
    return torch.full((B, H, T), 1.0 / b, device=device, dtype=cd)


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
        # its rate beta = lr * token_eta[0] must be >= 0 (lr is checked by the caller)
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
