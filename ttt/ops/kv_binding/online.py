"""The online TTT recurrence of a LaCT-style SwiGLU fast weight with its inner gradient written out: the
training form of the ``lact`` ablations, which have no parallel form (``update_all`` trains the feature
map; ``weight_norm`` rescales every trained fast weight after every step).

Per head, inner model ``f(x) = a(x) W1`` with ``a(x) = silu(x W0) * (x W2)``. One token's loss is
``lr_t l(f(k_t), v_t)`` with the dot loss ``l = -<f, v>`` (gradient ``g = -lr_t v_t`` at ``f``) or the
MSE ``l = 1/2 ||f - v||^2`` (``g = lr_t (f(k_t) - v_t)``). With ``h0 = k W0``, ``h2 = k W2``, ``s =
silu(h0)``, ``a = s * h2`` and ``e = W1 g`` (the gradient at ``a``):

    dW1 = a^T g,   dW2 = k^T (e * s),   dW0 = k^T (e * h2 * silu'(h0)),
    silu'(h) = sigmoid(h) (1 + h (1 - sigmoid(h)))

-- rank-one outer products. The loop keeps W0 and W2 side by side as one ``[D, 2M]`` matrix (one product
gives ``h0`` and ``h2``), folds each rank-one step into its matrix with one ``baddbmm``, and splits the
inputs into tokens once (``unbind``: a slice per token would make autograd zero-fill a whole-sequence
gradient per token). A training step of the tiny LM's layer runs about 3x faster than with
``torch.func``'s traced gradient. ``lact_recurrent`` (the oracle, gradients from ``torch.func``) is what
the tests compare this with, forward and every gradient, in float64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _checks

__all__ = ["lact_online"]


def lact_online(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    params: tuple[Tensor, Tensor, Tensor],
    *,
    lr: Tensor | float = 1.0,
    loss: str = "dot",
    ascent: bool = False,
    inner_steps: int = 1,
    momentum: float = 0.0,
    update_all: bool = False,
    weight_norm: bool = False,
) -> Tensor:
    """Online TTT of the SwiGLU fast weight, one token at a time: ``lact_recurrent`` without
    ``shifted_chunk_size`` and Muon, each step's gradient written out (see the module docstring).

    Args:
        q, k: [B, H, T, D]; v: [B, H, T, Dv].
        params: ``(W0 [H, D, M], W1 [H, M, Dv], W2 [H, D, M])`` initial fast weights.
        lr: per-token learning rate [B, H, T] or a constant (>= 0).
        loss: "dot" (LaCT) or "mse".
        ascent: step along +gradient.
        inner_steps: gradient steps per token, all on that token.
        momentum: ``U_t = mu U_{t-1} + sign * Delta_t``, ``P_t = P_{t-1} - U_t``.
        update_all: also train W0 and W2; default: the last layer W1 only.
        weight_norm: after each update rescale every column of each trained fast weight (W1; W0 and W2
            too with ``update_all``) to its initial norm, as LaCT does.

    Returns:
        o [B, H, T, Dv]: ``o_t = f_{P_t}(q_t)``, read after the step on token t.
    """
    if loss not in ("dot", "mse"):
        raise ValueError(f"loss must be 'dot' or 'mse', got {loss!r}")
    B, H, T, D = _checks.check_qkv(q, k, v, same_qk_v_dim=False)
    lr = _checks.check_lr(lr, B, H, T, q.device, q.dtype)  # >= 0: gradient ascent is ascent=True
    momentum = _checks.check_coefficient("momentum", momentum, high_open=True)
    if not isinstance(inner_steps, int) or isinstance(inner_steps, bool) or inner_steps < 1:
        raise ValueError(f"inner_steps must be a positive int, got {inner_steps!r}")
    Dv, N = v.shape[-1], B * H
    M = _checks.check_swiglu_weights(params, H, D, Dv)
    W0, W1, W2 = params
    if T == 0:  # as every op: an empty output
        return q.new_zeros(B, H, 0, Dv)
    Wf = torch.cat([W0, W2], dim=-1).unsqueeze(0).expand(B, H, D, 2 * M).reshape(N, D, 2 * M)
    W1 = W1.unsqueeze(0).expand(B, H, M, Dv).reshape(N, M, Dv)
    norm_1 = W1.norm(dim=-2, keepdim=True) if weight_norm else None
    norm_f = Wf.norm(dim=-2, keepdim=True) if weight_norm and update_all else None
    sign = -1.0 if ascent else 1.0
    fused = inner_steps == 1 and momentum == 0.0  # the step is one rank-one product: fold it in directly
    qs = q.reshape(N, T, 1, D).unbind(1)  # T tensors [N, 1, D]
    ks = k.reshape(N, T, 1, D).unbind(1)
    vs = v.reshape(N, T, 1, Dv).unbind(1)
    lrs = lr.reshape(N, T, 1, 1).unbind(1)
    # without update_all the features never change: compute them for every token at once
    feats_k = feats_q = None
    if not update_all:
        feats_k = _swiglu_features(k.reshape(N, T, D) @ Wf, M).unbind(1)  # T tensors [N, M]
        feats_q = _swiglu_features(q.reshape(N, T, D) @ Wf, M).unbind(1)
    Uf = U1 = None
    outputs = []
    for t in range(T):
        k_t, v_t, lr_t = ks[t], vs[t], lrs[t]
        cur_f, cur_1 = Wf, W1
        for _ in range(inner_steps):
            if update_all:
                h0, h2 = (k_t @ cur_f).split(M, dim=-1)  # [N, 1, M] each
                s = F.silu(h0)
                a = s * h2
            else:
                a = feats_k[t][:, None]
            g = -lr_t * v_t if loss == "dot" else lr_t * (a @ cur_1 - v_t)  # [N, 1, Dv]: dl/df
            if update_all:
                e = g @ cur_1.transpose(1, 2)  # [N, 1, M]: dl/da
                sig = torch.sigmoid(h0)
                dh = torch.cat([e * h2 * sig * (1 + h0 * (1 - sig)), e * s], dim=-1)  # [N, 1, 2M]
                cur_f = torch.baddbmm(cur_f, k_t.transpose(1, 2), dh, alpha=-(sign if fused else 1.0))
            cur_1 = torch.baddbmm(cur_1, a.transpose(1, 2), g, alpha=-(sign if fused else 1.0))
        if fused:
            Wf, W1 = cur_f, cur_1
        else:  # the step: sign * (sum of the inner gradients) = sign * (P - cur), with momentum
            if update_all:
                Uf = sign * (Wf - cur_f) + (0.0 if Uf is None else momentum * Uf)
                Wf = Wf - Uf
            U1 = sign * (W1 - cur_1) + (0.0 if U1 is None else momentum * U1)
            W1 = W1 - U1
        if weight_norm:  # every column of each trained matrix back to its initial norm
            W1 = W1 * (norm_1 * torch.rsqrt(W1.square().sum(dim=-2, keepdim=True)))
            if update_all:
                Wf = Wf * (norm_f * torch.rsqrt(Wf.square().sum(dim=-2, keepdim=True)))
        a_q = _swiglu_features(qs[t] @ Wf, M) if update_all else feats_q[t][:, None]
        outputs.append(a_q @ W1)  # [N, 1, Dv]
    return torch.cat(outputs, dim=1).reshape(B, H, T, Dv)


def _swiglu_features(h: Tensor, M: int) -> Tensor:
    """``silu(h0) * h2`` for ``h = [h0 | h2]`` (last dim 2M)."""
    h0, h2 = h.split(M, dim=-1)
    return F.silu(h0) * h2
