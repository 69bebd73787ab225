"""Math used unchanged by several TTT operators: the inner LayerNorm, its fused L2 gradient, dtypes.

Shapes: ``z`` is ``[B, H, n, D]`` and per-head LN parameters are ``[H, D]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Fast weights and accumulation run in float32, or float64 when the inputs are float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def per_head(p: Tensor) -> Tensor:
    """``[H, D]`` -> ``[1, H, 1, D]`` so it broadcasts over ``[B, H, n, D]``."""
    return p[None, :, None, :]


def layer_norm(z: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """Per-head LayerNorm over the last dim (biased variance, as Sun et al.). z ``[B, H, n, D]``."""
    mu = z.mean(-1, keepdim=True)
    var = (z - mu).pow(2).mean(-1, keepdim=True)
    return (z - mu) * torch.rsqrt(var + eps) * per_head(weight) + per_head(bias)


def ln_l2_grad(z: Tensor, target: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """Closed-form ``d/dz 0.5 * ||LN(z) - target||^2`` for every row of ``z`` ``[B, H, n, D]``.

    With ``x = (z - mu) / s`` and ``s = sqrt(var + eps)``, the LayerNorm backward of the upstream
    gradient ``gx = (LN(z) - target) * weight`` is ``(gx - mean(gx) - x * mean(gx * x)) / s``.
    Tested against ``torch.func.grad`` of the loss; never trusted on its own.
    """
    mu = z.mean(-1, keepdim=True)
    var = (z - mu).pow(2).mean(-1, keepdim=True)
    rstd = torch.rsqrt(var + eps)
    x = (z - mu) * rstd
    gx = (x * per_head(weight) + per_head(bias) - target) * per_head(weight)
    return (gx - gx.mean(-1, keepdim=True) - x * (gx * x).mean(-1, keepdim=True)) * rstd


def grad_of_inner_loss(Z: Tensor, TW: Tensor, w2: Tensor, eps: float) -> Tensor:
    """``d/dz 0.5 * ||LN(z) * w + beta - t||^2`` with ``TW = (t - beta) * w`` and ``w2 = w * w``.

    Uses ATen's fused LayerNorm forward/backward: the closed form of ``common.ln_l2_grad`` in 2 ops.
    """
    x, mean, rstd = torch.native_layer_norm(Z, Z.shape[-1:], None, None, eps)
    return torch.ops.aten.native_layer_norm_backward(
        x * w2 - TW, Z, Z.shape[-1:], mean, rstd, None, None, [True, False, False]
    )[0]


def gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


def default_token_eta(
    mini_batch_size: int, device: torch.device | None = None, dtype: torch.dtype = torch.float64
) -> Tensor:
    """``[b]``: ``token_eta[i] = 1 / (i + 1)``: token i of a mini-batch sees the running mean of the
    gradients (Sun et al.; the default of every op, and the base of the layers' learnable one)."""
    return 1.0 / torch.arange(1, mini_batch_size + 1, device=device, dtype=dtype)


def split_segments(T: int, offset: int, mini_batch_size: int) -> list[tuple[int, int]]:
    """Cut ``[0, T)`` into ``(start, length)`` pieces that never cross a mini-batch boundary.

    ``offset`` tokens of the current mini-batch were consumed before position 0, so the first piece
    only fills that mini-batch up.
    """
    segments, start, off = [], 0, offset
    while start < T:
        length = min(mini_batch_size - off, T - start)
        segments.append((start, length))
        start, off = start + length, (off + length) % mini_batch_size
    return segments


def split_time(x: Tensor, segments: list[tuple[int, int]]) -> dict[int, Tensor]:
    """``{start: x[:, :, start:start + length]}`` for every segment, cut with one ``split``.

    Slicing a big tensor inside a loop makes autograd quadratic (every slice's backward writes a
    full-size zero gradient); ``split`` has a single backward that concatenates.
    """
    if not segments:
        return {}
    parts = x.split([length for _, length in segments], dim=2)
    return {start: part for (start, _), part in zip(segments, parts)}


def scan_mini_batches(step, anchor, grad_sum, offset: int, T: int, token_eta: Tensor, mini_batch_size: int):
    """Run ``step`` over the segments of ``split_segments`` and commit each completed mini-batch.

    ``step(start, length, offset, anchor, grad_sum) -> (out, grad_sum)`` processes tokens
    ``[start, start + length)`` that sit at ``offset..offset+length-1`` inside their mini-batch and
    returns the grad sum including them. When a mini-batch completes, the next one starts from the
    weights of its last token: ``anchor - token_eta[b - 1] * grad_sum``.

    Returns ``(outs, anchor, grad_sum, offset)``.
    """
    outs = []
    for start, length in split_segments(T, offset, mini_batch_size):
        out, grad_sum = step(start, length, offset, anchor, grad_sum)
        outs.append(out)
        offset += length
        if offset == mini_batch_size:
            anchor = tuple(a - token_eta[-1] * g for a, g in zip(anchor, grad_sum))
            grad_sum = tuple(torch.zeros_like(g) for g in grad_sum)
            offset = 0
    return outs, anchor, grad_sum, offset


def causal_eta_scores(qx: Tensor, kx: Tensor, lr: Tensor, token_eta: Tensor, bias: bool = True) -> Tensor:
    """``A[i, j] = token_eta[i] * lr[j] * (qx_i . kx_j + 1)`` for ``j <= i``, else 0.

    The dual form of one linear layer ``x W + b`` read at the weights of token i: the ``+ 1`` is the
    bias (dropped with ``bias=False``). qx, kx ``[B, H, c, D]``; lr ``[B, H, c]``; token_eta ``[c]``;
    returns ``[B, H, c, c]``.
    """
    c = qx.shape[-2]
    mask = torch.ones(c, c, dtype=torch.bool, device=qx.device).tril()
    scores = (qx @ kx.transpose(-1, -2) + float(bias)) * token_eta[:, None] * lr[..., None, :]
    return scores.masked_fill(~mask, 0)
