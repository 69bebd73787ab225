"""Layers for the additive rows of the family (``ttt.ops.family``):
``S_t = Diag(alpha_t) S_{t-1} + beta_t k_t v_t^T``.

Linear attention, RetNet, Mamba2, GLA and HGRN2, each with the projections, gates and output norm of its
paper (deviations are named in the class docstrings and docs/layers.md). Padding: a padded token gets a
zero key (or learning rate) and no decay, so the state is exactly unchanged.

Shapes: B batch, T tokens, C model width, H heads, Dk key head dim, Dv value head dim, N Mamba2 state size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ttt.layers.matrix import MatrixMixer, MatrixState, mamba_decay_init, mask_tokens
from ttt.layers.protocol import merge_heads, split_heads
from ttt.modules.conv import ShortConv
from ttt.modules.norm import GatedRMSNorm, RMSNorm
from ttt.modules.rotary import apply_rotary, check_rope_theta, rotary_cos_sin

_FORMS_DOC = """
        impl: operator form in ``forward``: ``"auto"`` | ``"chunk"`` | ``"recurrent"`` | ``"reference"``,
            or a registered backend (``ttt.ops.forms``). Default: ``"auto"`` (the chunk form here).
        decode_impl: form in ``step`` and a one-token ``forward``. Default: ``"auto"`` (the recurrent
            form here).
        chunk_size: tokens per chunk of the chunk form. Default: ``64``.
"""


def per_head_per_token(values: Tensor, batch: int, length: int, dtype: torch.dtype) -> Tensor:
    """``values [H]`` repeated for every sequence and token: ``[B, H, T]``, in ``dtype`` but at least float32
    (under autocast q is bf16, and a decay rounded to bf16 compounds over T)."""
    return values.to(torch.promote_types(dtype, torch.float32))[None, :, None].expand(batch, -1, length)


class LinearAttention(MatrixMixer):
    __doc__ = (
        """Linear attention (Katharopoulos et al., arXiv 2006.16236).

    Output ``phi(q)^T S_t / phi(q)^T z_t``.

    ``phi(x) = elu(x) + 1`` on q and k per head, ``S_t = S_{t-1} + phi(k_t) v_t^T`` and the normaliser
    ``z_t = sum phi(k)``. The normaliser rides in the same state as an extra value column of ones, so one
    operator call gives both. Bias-free q/k/v/o projections, no output norm (as the paper).

    Args:
        dim, num_heads: model width C and heads H (D = C / H).
        normalize: divide by ``phi(q)^T z_t``. Default: ``True`` (the paper); ``False`` gives the
            unnormalised form of the TTT equivalence (Sun et al. Thm 1)."""
        + _FORMS_DOC
        + "    "
    )

    op = "linear_attention"

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        normalize: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(dim, num_heads, **kwargs)
        self.normalize = normalize
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (
            nn.Linear(dim, dim, bias=False) for _ in range(4)
        )

    def _mix(self, x: Tensor, state: MatrixState, mask: Tensor | None, decode: bool):
        q = F.elu(split_heads(self.q_proj(x), self.num_heads)) + 1  # [B, H, T, D]
        k = F.elu(split_heads(self.k_proj(x), self.num_heads)) + 1
        v = split_heads(self.v_proj(x), self.num_heads)
        if self.normalize:
            v = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)  # [B, H, T, D + 1]
        (k,) = mask_tokens(mask, k)
        o, S = self._operator(q, k, v, state=state, decode=decode, scale=1.0)
        if self.normalize:
            # phi > 0, so the normaliser only vanishes for a row with no real token yet (all padding)
            o = o[..., :-1] / o[..., -1:].clamp_min(torch.finfo(o.dtype).tiny)
        return self.o_proj(merge_heads(o)), S, []


class RetNet(MatrixMixer):
    __doc__ = (
        """Multi-scale retention (RetNet, Sun et al., arXiv 2307.08621).

    ``S_t = gamma_h S_{t-1} + k_t v_t^T``.

    Bias-free q/k/v projections, rotary positions on q and k (the paper's xPos without its length
    extrapolation scaling, as fla), a fixed decay per head ``gamma_h = 1 - 2^(-5 - h)``, q scaled by
    Dk^-1/2, and the output ``RMSNorm(o) * swish(x W_g)`` per head (the paper's GroupNorm replaced by
    RMSNorm, as fla). The decay is handed to ``ttt.ops.family.retnet`` per token (gamma on real tokens, 1
    on padding), so a padded token leaves the state as it is.

    Args:
        dim, num_heads: model width C and heads H (Dk = C / H, even for RoPE).
        expand_v: Dv / Dk. Default: ``1.0`` (the paper uses 2; 1 keeps attention's parameter count).
        rope_theta: RoPE base. Default: ``10000``."""
        + _FORMS_DOC
        + "    "
    )

    op = "retnet"

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        expand_v: float = 1.0,
        rope_theta: float = 10000.0,
        **kwargs,
    ) -> None:
        super().__init__(dim, num_heads, **kwargs)
        self.head_k_dim, self.rope_theta = dim // num_heads, check_rope_theta(rope_theta)
        if self.head_k_dim % 2:
            raise ValueError(f"head dim dim/num_heads must be even for RoPE, got {self.head_k_dim}")
        self.head_v_dim = int(self.head_k_dim * expand_v)
        value_width = num_heads * self.head_v_dim
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, value_width, bias=False)
        self.g_proj = nn.Linear(dim, value_width, bias=False)
        self.o_norm = GatedRMSNorm(self.head_v_dim)
        self.o_proj = nn.Linear(value_width, dim, bias=False)

    def log_gamma(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        """``log gamma_h = log(1 - 2^(-5 - h))`` per head ``[H]``, in ``dtype``: a constant of the layer,
        computed where it is used (a buffer would be cast by ``.to(bfloat16)`` and is not in the state
        dict, which transformers' loading leaves uninitialised)."""
        h = torch.arange(self.num_heads, device=device, dtype=dtype)
        return torch.log1p(-torch.exp2(-5.0 - h))

    def _mix(self, x: Tensor, state: MatrixState, mask: Tensor | None, decode: bool):
        batch, length, _ = x.shape
        q = split_heads(self.q_proj(x), self.num_heads)  # [B, H, T, Dk]
        k = split_heads(self.k_proj(x), self.num_heads)
        v = split_heads(self.v_proj(x), self.num_heads)  # [B, H, T, Dv]
        positions = state.lengths[:, None] + torch.arange(length, device=x.device)  # [B, T]
        cos, sin = rotary_cos_sin(positions, self.head_k_dim, theta=self.rope_theta)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        real = torch.promote_types(q.dtype, torch.float32)
        log_alpha = per_head_per_token(self.log_gamma(real, x.device), batch, length, q.dtype)  # [B, H, T]
        k, log_alpha = mask_tokens(mask, k, log_alpha)
        o, S = self._operator(q, k, v, state=state, decode=decode, alpha=log_alpha.exp())
        gate = self.g_proj(x).view(batch, length, self.num_heads, self.head_v_dim)
        o = self.o_norm(o.transpose(1, 2), gate)  # [B, T, H, Dv]
        return self.o_proj(o.reshape(batch, length, -1)), S, []


class Mamba2(MatrixMixer):
    __doc__ = (
        """Mamba2 (SSD; Dao & Gu, arXiv 2405.21060) as the scalar-decay row: q = C, k = B, v = x,
    ``alpha_t = exp(dt_t A)``, ``beta_t = dt_t``.

    One input projection to (z, x, B, C, dt); a causal depthwise conv (kernel 4, SiLU, bias) over
    (x, B, C); ``dt = softplus(dt_raw + dt_bias)``, ``A = -exp(A_log)`` per head; B and C shared by all
    heads (one group); the skip ``D x``; ``RMSNorm(y * silu(z))`` over the inner width (Mamba2's
    ``norm_before_gate=False``); output projection. Inner width ``expand * C`` split into H heads.

    Args:
        dim, num_heads: model width C and heads H (``expand * C % H == 0``).
        d_state: N, the key size of the state. Default: ``128`` (``mamba_ssm.Mamba2``).
        expand: inner width / C. Default: ``2``.
        conv_size: conv kernel. Default: ``4``."""
        + _FORMS_DOC
        + "    "
    )

    op = "mamba2"

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        d_state: int = 128,
        expand: int = 2,
        conv_size: int = 4,
        **kwargs,
    ) -> None:
        super().__init__(dim, num_heads, **kwargs)
        self.d_inner, self.d_state = expand * dim, d_state
        if self.d_inner % num_heads:
            raise ValueError(f"expand * dim = {self.d_inner} must be divisible by num_heads={num_heads}")
        self.head_dim = self.d_inner // num_heads
        conv_width = self.d_inner + 2 * d_state
        self.in_proj = nn.Linear(dim, self.d_inner + conv_width + num_heads, bias=False)
        self.conv = ShortConv(conv_width, conv_size, bias=True, activation="silu")
        A_log, dt_bias = mamba_decay_init(num_heads, a_range=(1.0, 16.0))
        self.A_log, self.dt_bias = nn.Parameter(A_log), nn.Parameter(dt_bias)
        self.D = nn.Parameter(torch.ones(num_heads))
        self.norm = RMSNorm(self.d_inner)
        self.out_proj = nn.Linear(self.d_inner, dim, bias=False)

    def conv_modules(self) -> list[ShortConv]:
        return [self.conv]

    def _mix(self, x: Tensor, state: MatrixState, mask: Tensor | None, decode: bool):
        batch, length, _ = x.shape
        z, xbc, dt_raw = self.in_proj(x).split(
            [self.d_inner, self.d_inner + 2 * self.d_state, self.num_heads], -1
        )
        (xbc,), caches = self._convolve([xbc], state, mask)
        u, b, c = xbc.split([self.d_inner, self.d_state, self.d_state], dim=-1)
        heads = (batch, self.num_heads, length, self.d_state)
        k = b[:, None].expand(heads)  # [B, H, T, N]
        q = c[:, None].expand(heads)
        v = split_heads(u, self.num_heads)  # [B, H, T, P]
        dt = F.softplus(dt_raw + self.dt_bias).transpose(1, 2)  # [B, H, T]
        log_alpha = -torch.exp(self.A_log)[None, :, None] * dt
        k, dt, log_alpha = mask_tokens(mask, k, dt, log_alpha)
        o, S = self._operator(q, k, v, state=state, decode=decode, beta=dt, log_alpha=log_alpha, scale=1.0)
        y = merge_heads(o + self.D[None, :, None, None] * v)  # [B, T, d_inner]
        return self.out_proj(self.norm(y * F.silu(z))), S, caches


class GatedLinearAttention(MatrixMixer):
    __doc__ = (
        """Gated linear attention (GLA; Yang et al., arXiv 2312.06635).

    ``S_t = Diag(alpha_t) S_{t-1} + k_t v_t^T``.

    Bias-free q/k/v projections with key width ``expand_k * C``; the per-channel forget gate
    ``log alpha = logsigmoid(x W_1 W_2 + b) / 16`` (low rank 16, normaliser 16, as the paper); q scaled by
    Dk^-1/2; output ``RMSNorm(o) * swish(x W_g)`` per head; output projection.

    Args:
        dim, num_heads: model width C and heads H.
        expand_k: key width / C. Default: ``0.5`` (the paper).
        gate_rank: rank of the forget-gate projection. Default: ``16``.
        gate_normalizer: divides the log gate (keeps decays near 1). Default: ``16``."""
        + _FORMS_DOC
        + "    "
    )

    op = "gla"

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        expand_k: float = 0.5,
        gate_rank: int = 16,
        gate_normalizer: float = 16.0,
        **kwargs,
    ) -> None:
        super().__init__(dim, num_heads, **kwargs)
        key_width = int(dim * expand_k)
        if key_width % num_heads or key_width == 0:
            raise ValueError(
                f"expand_k * dim = {key_width} must be a positive multiple of num_heads={num_heads}"
            )
        self.head_k_dim, self.head_v_dim = key_width // num_heads, dim // num_heads
        self.gate_normalizer = gate_normalizer
        self.q_proj = nn.Linear(dim, key_width, bias=False)
        self.k_proj = nn.Linear(dim, key_width, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.gk_proj = nn.Sequential(nn.Linear(dim, gate_rank, bias=False), nn.Linear(gate_rank, key_width))
        self.g_proj = nn.Linear(dim, dim, bias=False)
        self.o_norm = GatedRMSNorm(self.head_v_dim)
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def _mix(self, x: Tensor, state: MatrixState, mask: Tensor | None, decode: bool):
        batch, length, _ = x.shape
        q = split_heads(self.q_proj(x), self.num_heads)  # [B, H, T, Dk]
        k = split_heads(self.k_proj(x), self.num_heads)
        v = split_heads(self.v_proj(x), self.num_heads)  # [B, H, T, Dv]
        log_alpha = split_heads(F.logsigmoid(self.gk_proj(x)) / self.gate_normalizer, self.num_heads)
        k, log_alpha = mask_tokens(mask, k, log_alpha)
        o, S = self._operator(q, k, v, state=state, decode=decode, log_alpha=log_alpha)
        gate = self.g_proj(x).view(batch, length, self.num_heads, self.head_v_dim)
        o = self.o_norm(o.transpose(1, 2), gate)
        return self.o_proj(o.reshape(batch, length, -1)), S, []


class HGRN2(MatrixMixer):
    __doc__ = (
        """HGRN2 (Qin et al., arXiv 2404.07904): ``S_t = Diag(alpha_t) S_{t-1} + (1 - alpha_t) i_t^T``.

    Projections of x to the output gate q (SiLU), the forget gate f and the input i; ``alpha =
    sigmoid(f)``, the key tied to ``1 - alpha`` (the paper's state expansion); RMSNorm over the full
    width, output projection. The paper's layer-dependent lower bound on the forget gate is not
    implemented (lower bound 0).

    Args:
        dim, num_heads: model width C and heads H (forget-gate expansion D = C / H; the paper uses 128)."""
        + _FORMS_DOC
        + "    "
    )

    op = "hgrn2"

    def __init__(
        self,
        dim: int,
        num_heads: int,
        **kwargs,
    ) -> None:
        super().__init__(dim, num_heads, **kwargs)
        self.q_proj, self.f_proj, self.i_proj, self.o_proj = (
            nn.Linear(dim, dim, bias=False) for _ in range(4)
        )
        self.g_norm = RMSNorm(dim)

    def _mix(self, x: Tensor, state: MatrixState, mask: Tensor | None, decode: bool):
        q = F.silu(split_heads(self.q_proj(x), self.num_heads))  # [B, H, T, D]
        log_alpha = F.logsigmoid(split_heads(self.f_proj(x), self.num_heads))
        i = split_heads(self.i_proj(x), self.num_heads)
        (log_alpha,) = mask_tokens(mask, log_alpha)
        o, S = self._operator(q, i, state=state, decode=decode, log_alpha=log_alpha)
        return self.o_proj(self.g_norm(merge_heads(o))), S, []


class HebbianFastWeights(MatrixMixer):
    __doc__ = (
        """Hebbian fast weights (Ba et al., arXiv 1610.06258): ``S_t = lambda S_{t-1} + eta k_t v_t^T``.

    The ancestor of the family: a fast-weight memory written by a Hebbian outer product and read as
    ``o_t = S_t^T q_t``, with a learned decay ``lambda_h = sigmoid(.)`` (initially 0.95, the paper's value)
    and learning rate ``eta_h = softplus(.)`` (initially 0.5) per head. Around it: bias-free q/k/v
    projections, q and k L2-normalised per head, a per-head RMSNorm on the output (the paper's inner
    LayerNorm) and the output projection. Deviations, named: the paper's memory is auto-associative
    (q = k = v = the RNN's hidden state) inside a slow RNN that iterates it; here the layer is an
    attention replacement, so q, k, v are projections of the input. The constants are handed to
    ``ttt.ops.family.hebbian`` per token (decay 1 and rate 0 on padding), so a padded token leaves the
    state as it is.

    Args:
        dim, num_heads: model width C and heads H (D = C / H).
        decay: initial lambda in (0, 1). Default: ``0.95``.
        lr: initial eta > 0. Default: ``0.5``."""
        + _FORMS_DOC
        + "    "
    )

    op = "hebbian"

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        decay: float = 0.95,
        lr: float = 0.5,
        **kwargs,
    ) -> None:
        super().__init__(dim, num_heads, **kwargs)
        if not 0 < decay < 1 or lr <= 0:
            raise ValueError(f"need 0 < decay < 1 and lr > 0, got decay={decay}, lr={lr}")
        self.head_dim = dim // num_heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (
            nn.Linear(dim, dim, bias=False) for _ in range(4)
        )
        # parameters of sigmoid / softplus: the inverse functions of the initial values
        self.decay_logit = nn.Parameter(torch.full((num_heads,), math.log(decay / (1 - decay))))
        self.lr_raw = nn.Parameter(torch.full((num_heads,), math.log(math.expm1(lr))))
        self.o_norm = RMSNorm(self.head_dim)

    def rates(self) -> tuple[Tensor, Tensor]:
        """(lambda [H], eta [H]): the current decay and learning rate per head."""
        return torch.sigmoid(self.decay_logit), F.softplus(self.lr_raw)

    def _mix(self, x: Tensor, state: MatrixState, mask: Tensor | None, decode: bool):
        batch, length, _ = x.shape
        q = F.normalize(split_heads(self.q_proj(x), self.num_heads), dim=-1, eps=1e-6)  # [B, H, T, D]
        k = F.normalize(split_heads(self.k_proj(x), self.num_heads), dim=-1, eps=1e-6)
        v = split_heads(self.v_proj(x), self.num_heads)
        _, lr = self.rates()
        eta = per_head_per_token(lr, batch, length, q.dtype)  # [B, H, T]
        log_decay = per_head_per_token(F.logsigmoid(self.decay_logit), batch, length, q.dtype)
        k, eta, log_decay = mask_tokens(mask, k, eta, log_decay)
        o, S = self._operator(q, k, v, state=state, decode=decode, decay=log_decay.exp(), lr=eta, scale=1.0)
        o = self.o_norm(o.transpose(1, 2))  # [B, T, H, D]
        return self.o_proj(o.reshape(batch, length, -1)), S, []
