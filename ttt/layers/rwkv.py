"""RWKV-7 "Goose" time mixing (Peng et al., arXiv 2503.14456) on ``ttt.ops.family.rwkv7``.

The rule, in the family's ``[Dk, Dv]`` layout (the paper writes the transpose):

    S_t = (Diag(w_t) - (a_t * kk_t) kk_t^T) S_{t-1} + k_t v_t^T,    o_t = S_t^T r_t

(the layer adds the current token's bonus ``(r_t . (rk * k_t)) v_t`` after the output norm), with ``w``
the per-channel decay, ``a`` the in-context learning rate, ``kk`` the L2-normalised removal key
and ``k`` the replacement key ``k * (1 + (a - 1) k_a)``. As a TTT rule it is one step of gradient descent
on ``<S^T (a * kk), sg(S^T kk)> - <S^T k, v>`` plus a decay penalty (``docs/family.md``).

Shapes: B batch, T tokens, C model width, H heads, D = C / H head dim (keys and values alike).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ttt.layers.matrix import MatrixMixer, MatrixState, mask_tokens
from ttt.layers.protocol import split_heads
from ttt.modules.conv import TokenShift


def _lora_rank(width: int, factor: float, power: float) -> int:
    """RWKV-7's low-rank sizes: ``factor * C^power`` rounded to a multiple of 32, at least 32."""
    return max(32, int(round(factor * width**power / 32) * 32))


class _LoRA(nn.Module):
    """``act(x A) B`` (+ ``bias``): RWKV-7's low-rank projections. A starts at zero, so each projection starts
    at its bias and learns from the gradient B passes back."""

    def __init__(self, dim: int, rank: int, act: str | None, bias: bool = True) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.zeros(dim, rank))
        self.B = nn.Parameter(torch.randn(rank, dim) * (0.1 / math.sqrt(rank)))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        h = x @ self.A
        h = torch.tanh(h) if self.act == "tanh" else torch.sigmoid(h) if self.act == "sigmoid" else h
        y = h @ self.B
        return y if self.bias is None else y + self.bias


class RWKV7(MatrixMixer):
    """RWKV-7 time mixing (arXiv 2503.14456), the recurrence run by ``ttt.ops.family.rwkv7``.

    Per token, from the token shift ``x' = x_{t-1}`` and six learned interpolations
    ``x_c = x + (x' - x) * mu_c``: ``r, k, v = W x_r, W x_k, W x_v``; decay
    ``w = exp(-e^{-1/2} sigmoid(w0 + tanh(x_w A_w) B_w))`` in (0.545, 1); in-context learning rate
    ``a = sigmoid(a0 + x_a A_a B_a)``; removal key ``kk = normalize(k * k_k)`` per head; replacement key
    ``k * (1 + (a - 1) k_a)``; output ``W_o ((GroupNorm(o) + bonus) * sigmoid(x_g G_1) G_2)`` with the bonus
    ``(r . (r_k * k)) v`` per head.

    Deviations from the paper's model, named: no value residual (the first layer's v mixed into later
    layers' needs the layers to share state, which a mixer does not); the interpolations and decay
    offsets start as the paper's first layer (a mixer does not know its depth); low-rank factors start
    as ``A = 0`` and a small random B.

    Args:
        dim: model width C.
        num_heads: H (``dim % num_heads == 0``); head dim D = C / H.
        norm_eps: GroupNorm epsilon. Default: ``64e-5`` (the paper's ``1e-5 * 8^2``).
        impl: operator form in ``forward``: ``"auto"`` | ``"chunk"`` | ``"recurrent"`` | ``"reference"``,
            or a registered backend (``ttt.ops.forms``). Default: ``"auto"`` (chunk here).
        decode_impl: form in ``step`` and a one-token ``forward``. Default: ``"auto"`` (recurrent here).
        chunk_size: tokens per chunk of the chunk form. Default: ``64``.

    The state is :class:`~ttt.layers.matrix.MatrixState` with ``S [B, H, D, D]`` and the token-shift cache.

    Examples::

        >>> import torch
        >>> from ttt.layers import RWKV7
        >>> layer = RWKV7(dim=64, num_heads=4)
        >>> y, state = layer(torch.randn(2, 20, 64))
        >>> y.shape, state.S.shape, state.convs[0].shape
        (torch.Size([2, 20, 64]), torch.Size([2, 4, 16, 16]), torch.Size([2, 64, 1]))
    """

    MIXES = ("r", "w", "k", "v", "a", "g")

    op = "rwkv7"

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        norm_eps: float = 64e-5,
        **kwargs,
    ) -> None:
        super().__init__(dim, num_heads, **kwargs)
        self.head_dim = dim // num_heads
        self.shift = TokenShift(dim)
        # first-layer interpolations of the paper's init: channel i of C gets 1 - (i / C)^p
        frac = torch.arange(dim, dtype=torch.float32) / dim
        powers = {"r": 0.2, "w": 0.9, "k": 0.7, "v": 0.7, "a": 0.9, "g": 0.2}
        self.mu = nn.ParameterDict({c: nn.Parameter(1.0 - frac ** powers[c]) for c in self.MIXES})
        self.r_proj, self.k_proj, self.v_proj, self.o_proj = (
            nn.Linear(dim, dim, bias=False) for _ in range(4)
        )
        self.w_lora = _LoRA(dim, _lora_rank(dim, 1.8, 0.5), "tanh")
        self.a_lora = _LoRA(dim, _lora_rank(dim, 1.8, 0.5), None)
        self.g_lora = _LoRA(dim, _lora_rank(dim, 0.6, 0.8), "sigmoid", bias=False)
        with torch.no_grad():  # decay offsets: -7 .. -2 over the channels (the paper's first layer), + 0.5
            self.w_lora.bias.copy_(-7 + 5 * (torch.arange(dim) / max(dim - 1, 1)) ** 0.85 + 0.5)
        self.k_k = nn.Parameter(torch.full((dim,), 0.85))
        self.k_a = nn.Parameter(torch.ones(dim))
        self.r_k = nn.Parameter(torch.full((num_heads, self.head_dim), -0.04))
        self.o_norm = nn.GroupNorm(num_heads, dim, eps=norm_eps)

    def conv_modules(self) -> list[TokenShift]:
        return [self.shift]

    def _mix(self, x: Tensor, state: MatrixState, mask: Tensor | None, decode: bool):
        batch, length, _ = x.shape
        heads = lambda t: split_heads(t, self.num_heads)  # noqa: E731  [B, T, C] -> [B, H, T, D]
        prev, caches = self._convolve([x], state, mask)
        delta = prev[0] - x
        xs = {c: x + delta * self.mu[c] for c in self.MIXES}
        r, k, v = self.r_proj(xs["r"]), self.k_proj(xs["k"]), self.v_proj(xs["v"])
        log_w = -math.exp(-0.5) * torch.sigmoid(self.w_lora(xs["w"]))  # log decay in (-0.607, 0)
        a = torch.sigmoid(self.a_lora(xs["a"]))
        kk = F.normalize(heads(k * self.k_k), dim=-1, eps=1e-12)
        k = k * (1 + (a - 1) * self.k_a)
        r, k, v, a, log_w = heads(r), heads(k), heads(v), heads(a), heads(log_w)
        # a padded token: no write (k = 0), no removal (a = 0), no decay (log w = 0)
        k, a, log_w = mask_tokens(mask, k, a, log_w)
        o, S = self._operator(r, k, v, state=state, decode=decode, beta=a, k_hat=kk, log_alpha=log_w,
                              scale=1.0)  # fmt: skip
        o = self.o_norm(o.transpose(1, 2).reshape(batch * length, -1)).view(batch, length, -1)
        bonus = (r * k * self.r_k[:, None, :]).sum(-1, keepdim=True) * v  # the current token's, [B, H, T, D]
        o = o + bonus.transpose(1, 2).reshape(batch, length, -1)
        return self.o_proj(o * self.g_lora(xs["g"])), S, caches

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, impl={self.impl!r}, "
                f"decode_impl={self.decode_impl!r}")  # fmt: skip
