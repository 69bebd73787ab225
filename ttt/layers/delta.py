"""Layers for the delta rows of ``ttt.ops.family``: DeltaNet, Gated DeltaNet, KDA, Longhorn, Comba.

All four share the body of the Gated DeltaNet layer (Yang et al., arXiv 2412.06464, as in fla's
``GatedDeltaNet``): bias-free q/k/v projections, a causal short convolution with SiLU on each, L2-normalised
q and k per head, a per-token learning rate ``beta = sigmoid(x W_beta)``, the rule's decay, a per-head
output RMSNorm (gated for GDN and KDA), and the output projection. They differ only in the gates they feed
the operator (``_gates``). The state (:class:`~ttt.layers.matrix.MatrixState`) is the matrix
``S [B, H, Dk, Dv]`` plus the conv caches of q, k, v.

Shapes: B batch, T tokens, C model width, H heads, Dk = C / H key head dim, Dv = expand_v * Dk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ttt.layers.matrix import MatrixMixer, MatrixState, mamba_decay_init, mask_tokens
from ttt.layers.protocol import split_heads
from ttt.modules.conv import ShortConv
from ttt.modules.norm import GatedRMSNorm, RMSNorm


class _DeltaFamilyLayer(MatrixMixer):
    """The shared body; subclasses set ``op`` (the rule), ``gated_norm`` and define ``_gates``."""

    gated_norm: str | None = None  # activation of the output gate, or None for a plain RMSNorm

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        expand_v: float = 1.0,
        conv_size: int | None = 4,
        norm_eps: float = 1e-6,
        **kwargs,
    ) -> None:
        super().__init__(dim, num_heads, **kwargs)
        self.head_k_dim = dim // num_heads
        self.head_v_dim = int(self.head_k_dim * expand_v)
        if self.head_v_dim < 1:
            raise ValueError(f"expand_v={expand_v} leaves no value dims")
        key_width, value_width = dim, num_heads * self.head_v_dim
        self.q_proj = nn.Linear(dim, key_width, bias=False)
        self.k_proj = nn.Linear(dim, key_width, bias=False)
        self.v_proj = nn.Linear(dim, value_width, bias=False)
        self.b_proj = nn.Linear(dim, num_heads, bias=False)
        convs = conv_size is not None and conv_size > 0
        self.conv_q = ShortConv(key_width, conv_size, activation="silu") if convs else None
        self.conv_k = ShortConv(key_width, conv_size, activation="silu") if convs else None
        self.conv_v = ShortConv(value_width, conv_size, activation="silu") if convs else None
        if self.gated_norm is not None:
            self.g_proj = nn.Linear(dim, value_width, bias=False)
            self.o_norm = GatedRMSNorm(self.head_v_dim, eps=norm_eps, activation=self.gated_norm)
        else:
            self.g_proj = None
            self.o_norm = RMSNorm(self.head_v_dim, eps=norm_eps)
        self.o_proj = nn.Linear(value_width, dim, bias=False)

    def _gates(self, x: Tensor, k: Tensor) -> dict[str, Tensor]:
        """The rule's per-token inputs from ``x [B, T, C]`` and the normalised keys ``k [B, H, T, Dk]``,
        each ``[B, H, T]`` or ``[B, H, T, D]``."""
        raise NotImplementedError

    def _correct_query(self, q: Tensor, gates: dict[str, Tensor]) -> Tensor:
        """Hook for rules that adjust the query (Comba's output correction); identity by default."""
        return q

    def conv_modules(self) -> list[ShortConv]:
        return [] if self.conv_q is None else [self.conv_q, self.conv_k, self.conv_v]

    def _mix(self, x: Tensor, state: MatrixState, mask: Tensor | None, decode: bool):
        batch, length, _ = x.shape
        (q, k, v), caches = self._convolve([self.q_proj(x), self.k_proj(x), self.v_proj(x)], state, mask)
        q = F.normalize(split_heads(q, self.num_heads), dim=-1, eps=1e-6)  # [B, H, T, Dk]
        k = F.normalize(split_heads(k, self.num_heads), dim=-1, eps=1e-6)
        v = split_heads(v, self.num_heads)  # [B, H, T, Dv]
        gates = self._gates(x, k)
        q = self._correct_query(q, gates)
        k, *values = mask_tokens(mask, k, *gates.values())
        o, S = self._operator(q, k, v, state=state, decode=decode, **dict(zip(gates, values)))
        o = o.transpose(1, 2)  # [B, T, H, Dv]
        if self.g_proj is not None:
            o = self.o_norm(o, self.g_proj(x).view(batch, length, self.num_heads, self.head_v_dim))
        else:
            o = self.o_norm(o)
        return self.o_proj(o.reshape(batch, length, -1)), S, caches

    def extra_repr(self) -> str:
        return (f"rule={self.op!r}, dim={self.dim}, num_heads={self.num_heads}, "
                f"head_k_dim={self.head_k_dim}, head_v_dim={self.head_v_dim}, impl={self.impl!r}, "
                f"decode_impl={self.decode_impl!r}")  # fmt: skip


_ARGS_DOC = """
    Args:
        dim: model width C.
        num_heads: H (``dim % num_heads == 0``); key head dim Dk = C / H.
        expand_v: Dv / Dk. Default: ``1.0`` (fla's GDN uses 2, which doubles the state and the value
            projections; 1 keeps the layer near attention's parameter count).
        conv_size: kernel of the causal short convs on q, k, v (SiLU); ``None`` or 0 for none.
            Default: ``4`` (GDN, DeltaNet, Mamba).
        norm_eps: output RMSNorm epsilon. Default: ``1e-6``.
        impl: form of the operator in ``forward``: ``"auto"`` | ``"chunk"`` | ``"recurrent"`` |
            ``"reference"``, or a registered backend (``ttt.ops.forms``). Default: ``"auto"`` (chunk here).
        decode_impl: form in ``step`` and a one-token ``forward``. Default: ``"auto"`` (recurrent here).
        chunk_size: tokens per chunk of the chunk form. Default: ``64``.

    ``last_impl`` records the form the last call ran.
"""


class DeltaNet(_DeltaFamilyLayer):
    __doc__ = (
        """DeltaNet (Schlag et al. 2021; Yang et al., arXiv 2406.06484).

    ``S_t = (I - beta k k^T) S_{t-1} + beta k v^T``.

    ``beta = sigmoid(x W_beta)`` per head; plain RMSNorm on the output (fla ``DeltaNet`` default).
"""
        + _ARGS_DOC
    )

    op = "deltanet"

    def _gates(self, x: Tensor, k: Tensor) -> dict[str, Tensor]:
        return {"beta": torch.sigmoid(self.b_proj(x)).transpose(1, 2)}  # [B, H, T]


class GatedDeltaNet(_DeltaFamilyLayer):
    __doc__ = (
        """Gated DeltaNet (Yang et al., arXiv 2412.06464): ``S_t = (I - beta k k^T) alpha S + beta k v^T``.

    ``beta = sigmoid(x W_beta)``; ``log alpha = -exp(A_log) * softplus(x W_a + dt_bias)`` per head with the
    Mamba2 initialisation (:func:`mamba_decay_init`); output ``RMSNorm(o) * silu(x W_g)``.
"""
        + _ARGS_DOC
    )

    op = "gated_deltanet"
    gated_norm = "silu"
    __doc__ += """
    Examples::

        >>> import torch
        >>> from ttt.layers import GatedDeltaNet
        >>> layer = GatedDeltaNet(dim=64, num_heads=4)
        >>> y, state = layer(torch.randn(2, 20, 64))
        >>> y.shape, state.S.shape, len(state.convs)
        (torch.Size([2, 20, 64]), torch.Size([2, 4, 16, 16]), 3)
    """

    def __init__(self, dim: int, num_heads: int, **kwargs) -> None:
        super().__init__(dim, num_heads, **kwargs)
        self.a_proj = nn.Linear(dim, num_heads, bias=False)
        A_log, dt_bias = mamba_decay_init(num_heads)
        self.A_log, self.dt_bias = nn.Parameter(A_log), nn.Parameter(dt_bias)

    def _gates(self, x: Tensor, k: Tensor) -> dict[str, Tensor]:
        log_alpha = -torch.exp(self.A_log) * F.softplus(self.a_proj(x) + self.dt_bias)  # [B, T, H]
        return {"beta": torch.sigmoid(self.b_proj(x)).transpose(1, 2), "log_alpha": log_alpha.transpose(1, 2)}


class KimiDeltaAttention(_DeltaFamilyLayer):
    __doc__ = (
        """Kimi Delta Attention (Kimi Linear, arXiv 2510.26692): GDN with a per-channel decay.

    ``log alpha = -exp(A_log) * softplus(x W_f + dt_bias)`` with one value per head and key channel (W_f
    low rank, rank Dk, as the paper); output ``RMSNorm(o) * sigmoid(x W_g)`` (full-rank W_g; the paper's
    output gate is low rank).
"""
        + _ARGS_DOC
    )

    op = "kda"
    gated_norm = "sigmoid"

    def __init__(self, dim: int, num_heads: int, **kwargs) -> None:
        super().__init__(dim, num_heads, **kwargs)
        self.f_proj = nn.Sequential(nn.Linear(dim, self.head_k_dim, bias=False),
                                    nn.Linear(self.head_k_dim, dim, bias=False))  # fmt: skip
        A_log, _ = mamba_decay_init(num_heads)
        _, dt_bias = mamba_decay_init(dim)
        self.A_log, self.dt_bias = nn.Parameter(A_log), nn.Parameter(dt_bias)

    def _gates(self, x: Tensor, k: Tensor) -> dict[str, Tensor]:
        batch, length, _ = x.shape
        raw = F.softplus(self.f_proj(x) + self.dt_bias).view(batch, length, self.num_heads, self.head_k_dim)
        log_alpha = -torch.exp(self.A_log)[:, None] * raw  # [B, T, H, Dk]
        return {"beta": torch.sigmoid(self.b_proj(x)).transpose(1, 2), "log_alpha": log_alpha.transpose(1, 2)}


class Longhorn(_DeltaFamilyLayer):
    __doc__ = (
        """Longhorn (Liu et al., arXiv 2407.14207): the implicit (proximal) online step on
    ``||S^T k - v||^2``, ``S_t = (I - eps k k^T) S + eps k v^T`` with
    ``eps = beta / (1 + beta k^T k)``; stable for any beta.

    ``beta = sigmoid(x W_beta)`` per head and value channel (the paper's per-channel step size); plain
    RMSNorm on the output. Shares the GDN body (convs, L2-normalised q, k) rather than the paper's
    Mamba block. With the per-channel beta the chunk form runs one delta rule per value channel; on
    CPU ``impl="recurrent"`` was 4.6x faster at T = 256 (C = 128, H = 4).
"""
        + _ARGS_DOC
    )

    op = "longhorn"

    def __init__(self, dim: int, num_heads: int, **kwargs) -> None:
        super().__init__(dim, num_heads, **kwargs)
        self.b_proj = nn.Linear(dim, num_heads * self.head_v_dim, bias=False)

    def _gates(self, x: Tensor, k: Tensor) -> dict[str, Tensor]:
        batch, length, _ = x.shape
        beta = torch.sigmoid(self.b_proj(x)).view(batch, length, self.num_heads, self.head_v_dim)
        return {"beta": beta.transpose(1, 2)}  # [B, H, T, Dv]


class Comba(_DeltaFamilyLayer):
    __doc__ = (
        """Comba (Hu et al., arXiv 2506.02475): closed-loop control of the delta rule,
    ``S_t = (alpha_t - beta_t k_t p_t^T) S_{t-1} + beta_t k_t v_t^T``, read with the corrected query
    ``q - D p``.

    The GDN body and decay, plus the feedback key ``p = sigmoid(d_h) * k`` (``d`` learnable per head,
    initialised to 1) and the output correction ``q - D_h p`` (``D`` initialised to
    ``correction_factor``), as fla's ``Comba`` layer; q and k are L2-normalised before the correction.
    Output ``RMSNorm(o) * sigmoid(x W_g)``.

    Extra argument:
        correction_factor: initial D. Default: ``1.0`` (fla notes 0.02 sometimes works better for small
            models).
"""
        + _ARGS_DOC
    )

    op = "comba"
    gated_norm = "sigmoid"

    def __init__(self, dim: int, num_heads: int, *, correction_factor: float = 1.0, **kwargs) -> None:
        super().__init__(dim, num_heads, **kwargs)
        self.a_proj = nn.Linear(dim, num_heads, bias=False)
        A_log, dt_bias = mamba_decay_init(num_heads)
        self.A_log, self.dt_bias = nn.Parameter(A_log), nn.Parameter(dt_bias)
        self.feedback = nn.Parameter(torch.ones(num_heads))
        self.D = nn.Parameter(torch.full((num_heads,), float(correction_factor)))

    def _gates(self, x: Tensor, k: Tensor) -> dict[str, Tensor]:
        log_alpha = -torch.exp(self.A_log) * F.softplus(self.a_proj(x) + self.dt_bias)  # [B, T, H]
        p = torch.sigmoid(self.feedback)[None, :, None, None] * k  # [B, H, T, Dk]
        return {
            "p": p,
            "beta": torch.sigmoid(self.b_proj(x)).transpose(1, 2),
            "log_alpha": log_alpha.transpose(1, 2),
        }

    def _correct_query(self, q: Tensor, gates: dict[str, Tensor]) -> Tensor:
        return q - self.D[None, :, None, None] * gates["p"]
