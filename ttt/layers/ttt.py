"""TTT-Linear and TTT-MLP layers (Sun et al., arXiv 2407.04620) as drop-in attention replacements.

The layer follows the official implementation (ttt-lm-pytorch / ttt-lm-jax): bias-free
q/k/v/o projections; RoPE on q, k with positions restarting every mini-batch; a per-head learned gate on
the inner learning rate, ``lr = base_lr * sigmoid(x w_h + b_h) / head_dim``; learnable offsets on
``token_eta = max(1/(i+1) + offset_i, 0)``; a learned initial fast model ``W0`` and an inner LayerNorm per
head; the TTT operator (``ttt.ops``) with the residual ``q + LN(f(q))``; a post-norm over the full width,
an optional GELU output gate, and the output projection. With ``share_qk=True`` the q and k come from one
projection through two separate causal short convolutions (the paper's "Mamba backbone" (M) variant).

Shapes: B batch, T tokens, C model width, H heads, D head dim C/H, M hidden width of TTT-MLP, b mini-batch.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import ttt.ops
from ttt.layers.base import RecurrentMixer
from ttt.layers.protocol import merge_heads, split_heads
from ttt.modules.conv import ShortConv
from ttt.modules.rotary import apply_rotary, check_rope_theta, rotary_cos_sin
from ttt.ops import Impl, TTTState
from ttt.ops._checks import gates_computed_by
from ttt.ops.common import default_token_eta


def final_token_eta(token_eta: Tensor, lengths: Tensor, length: int) -> Tensor:
    """``[B, T]``: for each token, ``token_eta`` at the position of the last real token of its mini-batch.

    A non-causal mini-batch reads ``theta_0 - token_eta[p] * sum_j lr_j grad_j`` with p the position of
    its last token. In a row of ``lengths[b]`` real tokens right-padded to ``length``, the last mini-batch
    ends at the last real token, not at the padded end, so p differs from the padded op's. The op reads
    ``token_eta`` in non-causal mode only at each mini-batch's last position, so ``lr_j * final_token_eta``
    with ``token_eta = 1`` gives every row the update of its unpadded sequence, for every impl.

    Args:
        token_eta: ``[b]``.
        lengths: ``[B]`` real tokens per row; mini-batches start at multiples of b.
        length: T.
    """
    b = token_eta.shape[0]
    steps = torch.arange(length, device=lengths.device)
    start = steps - steps % b  # [T] first token of each token's mini-batch
    last = torch.minimum(start + b, lengths[:, None]) - 1 - start  # [B, T]
    # padded tokens (past the last real one) get lr 0 anyway; clamp only keeps their index valid
    return token_eta[last.clamp(min=0)]


def pack_rows(mask: Tensor, *xs: Tensor) -> list[Tensor]:
    """Right-padded ``[B, H, T, ...]`` tensors -> the real tokens, row after row: ``[1, H, sum n_b, ...]``."""
    return [x.transpose(0, 1)[:, mask][None] for x in xs]


def packed_offsets(mask: Tensor) -> Tensor:
    """``cu_seqlens [B + 1]`` of the rows of a right-padding ``mask [B, T]`` packed by :func:`pack_rows`."""
    return F.pad(mask.sum(dim=1).cumsum(0), (1, 0))


def unpack_rows(packed: Tensor, mask: Tensor) -> Tensor:
    """Inverse of :func:`pack_rows` for ``packed [1, H, sum n_b, D]``: ``[B, H, T, D]``, zeros on padding."""
    out = packed.new_zeros(packed.shape[1], *mask.shape, packed.shape[-1])
    out[:, mask] = packed[0]
    return out.transpose(0, 1)


def padding_keeps_state(mask: Tensor, mini_batch_size: int) -> bool:
    """Whether a right-padded call leaves every row in the state of its unpadded sequence: a row with
    padding must end at a mini-batch boundary and pad whole mini-batches (its lr-0 tokens then change no
    weight, and the mini-batch offset and the RoPE position mod b agree). ``mask`` ``[B, T]`` bool."""
    lengths, length = mask.sum(dim=1), mask.shape[1]
    aligned = (lengths % mini_batch_size == 0) & (length % mini_batch_size == 0)
    return bool(((lengths == length) | aligned).all())


#: the base schedules of the per-position inner step ``token_eta`` (a learned offset is added to either)
TOKEN_ETA_BASES = ("harmonic", "constant")


@dataclass(frozen=True)
class TTTLayerState:
    """The state of a TTT layer after a prefix.

    Attributes:
        ttt: the operator's state (fast weights plus the partial mini-batch), or ``None`` before the
            first token (the layer then starts from its learned ``W0``, so gradients reach it).
        conv_q, conv_k: short-convolution caches ``[B, C, K - 1]`` (``None`` without ``share_qk``).
        position: tokens consumed so far (padded columns included): RoPE uses ``position mod b``, or
            each row's own mini-batch offset after a ragged (right-padded, causal) call.
        padded: True after a non-causal call whose mask padded a row inside a mini-batch (its state is
            not its unpadded sequence's): ``forward`` and ``step`` refuse to continue it. Causal calls
            pack the rows instead and return each row's exact state at its own offset.
    """

    ttt: TTTState | None
    conv_q: Tensor | None
    conv_k: Tensor | None
    position: int
    padded: bool = False

    def detach(self) -> TTTLayerState:
        """The same state cut from the autograd graph (truncated backprop through time)."""
        cut = lambda t: None if t is None else t.detach()  # noqa: E731
        return TTTLayerState(self.ttt.detach() if self.ttt else None, cut(self.conv_q), cut(self.conv_k),
                             self.position, self.padded)  # fmt: skip

    def nbytes(self) -> int:
        """Bytes of the recurrent state (fast weights, anchors, gradient sums, conv caches)."""
        tensors = [self.conv_q, self.conv_k]
        if self.ttt is not None:
            tensors += [*self.ttt.weights, *self.ttt.anchor, *self.ttt.grad_sum]
        # at a mini-batch boundary `weights` and `anchor` are the same tensors; count each once
        unique = {(t.data_ptr(), t.shape, t.dtype): t for t in tensors if t is not None}
        return sum(t.numel() * t.element_size() for t in unique.values())


class _TTTLayer(RecurrentMixer):
    """What TTT-Linear and TTT-MLP share (the arguments are documented on :class:`TTTLinear`); subclasses
    define the fast weights, the operator (``op``) and their default ``base_lr``.

    ``forward(x [B, T, C], state=None, mask=None) -> (y, TTTLayerState)``: padded tokens (``mask`` False,
    right padding) get inner learning rate 0, so they do not change the fast weights, and each row's real
    outputs equal those of its unpadded sequence (with ``causal=False`` too, at any real length). The
    returned state of a padded row is *not* that of the unpadded row (its padding still advanced the
    mini-batch position); do not continue it.
    """

    state_type = TTTLayerState

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        base_lr: float,
        mini_batch_size: int = 16,
        use_gate: bool = False,
        share_qk: bool = False,
        conv_size: int = 4,
        rope_theta: float = 10000.0,
        causal: bool = True,
        impl: Impl | str = "auto",
        decode_impl: Impl | str | None = "auto",
        token_eta_base: str = "harmonic",
        rope: bool = True,
        learn_token_eta: bool = True,
    ) -> None:
        super().__init__(dim, num_heads, impl=impl, decode_impl=decode_impl)
        self.causal = causal
        if (dim // num_heads) % 2:
            raise ValueError(f"head dim dim/num_heads must be even for RoPE, got {dim // num_heads}")
        if mini_batch_size < 1:
            raise ValueError(f"mini_batch_size must be >= 1, got {mini_batch_size}")
        switches = {"use_gate": use_gate, "share_qk": share_qk, "causal": causal, "rope": rope,
                    "learn_token_eta": learn_token_eta}  # fmt: skip
        for name, value in switches.items():  # a JSON "yes" or 0 from --mixer-kwargs must not pass as a bool
            if not isinstance(value, bool):
                raise TypeError(f"{type(self).__name__}: {name} must be True or False, got {value!r}")
        if token_eta_base not in TOKEN_ETA_BASES:
            raise ValueError(f"token_eta_base must be one of {TOKEN_ETA_BASES}, got {token_eta_base!r}")
        self.head_dim = dim // num_heads
        self.mini_batch_size, self.base_lr = mini_batch_size, base_lr
        self.rope_theta = check_rope_theta(rope_theta)
        self.share_qk = share_qk
        # set by ttt.distributed.enable_context_parallel: (process group, rank, micro-batches) of the split
        self.context_parallel: tuple[Any, int, int] | None = None
        self.token_eta_base, self.rope = token_eta_base, bool(rope)

        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = None if share_qk else nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)
        # the (M) variant: one projection, two causal convs (ttt-lm-jax ttt_layer.py, conv_q / conv_k)
        self.conv_q = ShortConv(dim, conv_size, bias=True) if share_qk else None
        self.conv_k = ShortConv(dim, conv_size, bias=True) if share_qk else None
        # inner learning-rate gate: one linear unit per head on x, N(0, 0.02) weights, zero bias
        self.lr_gate = nn.Linear(dim, num_heads)
        nn.init.normal_(self.lr_gate.weight, std=0.02)
        nn.init.zeros_(self.lr_gate.bias)
        self.token_eta_offset = nn.Parameter(torch.zeros(mini_batch_size), requires_grad=learn_token_eta)
        self.ln_weight = nn.Parameter(torch.ones(num_heads, self.head_dim))
        self.ln_bias = nn.Parameter(torch.zeros(num_heads, self.head_dim))
        self.post_norm = nn.LayerNorm(dim, eps=1e-6)
        self.g_proj = nn.Linear(dim, dim, bias=False) if use_gate else None

    def fast_weights(self) -> tuple[Tensor, ...]:
        """The learned initial fast model, per head (no batch dim)."""
        raise NotImplementedError

    def _op(self, q: Tensor, k: Tensor, v: Tensor, lr: Tensor, **kwargs) -> tuple[Tensor, TTTState]:
        raise NotImplementedError

    def _call(self, op, q: Tensor, k: Tensor, v: Tensor, lr: Tensor, **kwargs) -> tuple[Tensor, TTTState]:
        """``op`` on this process's tokens, or, under context parallelism, its relay over the ranks."""
        if self.context_parallel is None:
            return op(q, k, v, lr, self.ln_weight, self.ln_bias, **kwargs)
        from ttt.distributed import cp_ttt

        if isinstance(kwargs["initial_state"], TTTState):
            raise ValueError(
                f"{type(self).__name__} under context parallelism runs whole sequences from its learned "
                "initial state: pass state=None"
            )
        group, _, micro = self.context_parallel
        return cp_ttt(
            op, q, k, v, lr, self.ln_weight, self.ln_bias, group=group, micro_batches=micro, **kwargs
        )

    def token_eta(self) -> Tensor:
        """``[b]``: ``max(base_i + offset_i, 0)`` with ``base_i = 1/(i+1)`` (``"harmonic"``, ttt-lm-pytorch
        ``learnable_token_idx``) or ``1/b`` (``"constant"``)."""
        b, offset = self.mini_batch_size, self.token_eta_offset
        if self.token_eta_base == "harmonic":
            base = default_token_eta(b, offset.device, offset.dtype)
        else:
            base = torch.full((b,), 1.0 / b, device=offset.device, dtype=offset.dtype)
        return (base + offset).clamp(min=0)

    def init_state(self, batch_size: int, device=None, dtype=None) -> TTTLayerState:
        """The state before the first token: learned ``W0`` (``ttt=None``) and zero conv caches."""
        caches = [None, None]
        if self.share_qk:
            caches = [
                c.init_cache(batch_size, device=device, dtype=dtype) for c in (self.conv_q, self.conv_k)
            ]
        return TTTLayerState(None, caches[0], caches[1], 0)

    def forward(
        self, x: Tensor, state: TTTLayerState | None = None, mask: Tensor | None = None
    ) -> tuple[Tensor, TTTLayerState]:
        """Run the layer over a chunk.

        Args:
            x: ``[B, T, C]``.
            state: a :class:`TTTLayerState` from ``init_state`` or a previous call, or ``None``.
            mask: ``[B, T]`` bool, True = real token, right padding. Padded tokens get inner learning
                rate 0, so they do not change the fast weights, and each row's real outputs equal those
                of its unpadded sequence (with ``causal=False`` too, at any real length). Causal: the
                rows' real tokens run packed (``cu_seqlens``), so the returned state holds each row's
                exact state at its own offset and continues exactly (ragged prompts prefill in one call).
                Non-causal: a state with a row padded inside a mini-batch is marked ``padded`` and
                continuing it raises.

        Returns:
            ``(y [B, T, C], TTTLayerState)``.
        """
        y, new = super().forward(x, state, mask)
        if mask is not None and not self.causal and not padding_keeps_state(mask, self.mini_batch_size):
            new = replace(new, padded=True)  # causal calls pack the rows instead (see ``_run``)
        return y, new

    def _run(self, x: Tensor, state: TTTLayerState, mask: Tensor | None, decode: bool):
        length = x.shape[1]
        if state.padded:
            raise ValueError(
                f"{type(self).__name__}: this state comes from a call whose mask padded a row inside a "
                f"mini-batch (of {self.mini_batch_size}) with causal=False: that row's position ran on "
                "through the padding, so continuing it would be silently wrong; pad rows by whole "
                "mini-batches, or run them causal"
            )
        q, k, conv_q, conv_k = self._query_key(x, state, mask)
        v = split_heads(self.v_proj(x), self.num_heads)  # [B, H, T, D]
        if self.rope:
            # RoPE restarts every mini-batch: positions are absolute positions mod b (ttt-lm-pytorch l.869)
            start = state.position  # rows of a ragged prefill continue at their own positions: [B, 1]
            if state.ttt is not None and isinstance(state.ttt.offset, tuple):
                start = torch.tensor(state.ttt.offset, device=x.device)[:, None]
            if self.context_parallel:  # this rank's segment starts after the earlier ranks' segments
                start = start + self.context_parallel[1] * length
            positions = (start + torch.arange(length, device=x.device)) % self.mini_batch_size
            cos, sin = rotary_cos_sin(positions, self.head_dim, theta=self.rope_theta)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

        lr, token_eta = self._inner_lr(x, mask)
        initial = state.ttt if state.ttt is not None else self.fast_weights()
        ragged = mask is not None and self.causal and not bool(mask.all())
        cu_seqlens = None
        if ragged:  # each row's real tokens packed: every row ends in its own state, at its own offset
            (q, k, v, lr), cu_seqlens = pack_rows(mask, q, k, v, lr), packed_offsets(mask)
        impl = self._form(q, decode)
        with gates_computed_by(type(self).__name__):  # a NaN lr names its cause, the input x
            o, ttt_state = self._op(
                q, k, v, lr,
                initial_state=initial, token_eta=token_eta, mini_batch_size=self.mini_batch_size,
                causal=self.causal, output_final_state=True, impl=impl, decode=decode, cu_seqlens=cu_seqlens,
            )  # fmt: skip
        if ragged:
            o = unpack_rows(o, mask)

        y = self.post_norm(merge_heads(o))  # [B, T, C]
        if self.g_proj is not None:
            y = F.gelu(self.g_proj(x), approximate="tanh") * y
        return self.o_proj(y), TTTLayerState(ttt_state, conv_q, conv_k, state.position + length)

    def _inner_lr(self, x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """The op's ``lr [B, H, T]`` (0 on padding) and ``token_eta [b]``.

        Non-causal: ``token_eta`` is folded into ``lr`` (:func:`final_token_eta`) and the op gets ones, so
        a row's last, partly padded mini-batch reads the weights its unpadded sequence would. Only the
        gradient sum of a state that ends inside a mini-batch differs (scaled by ``token_eta``), and such a
        state cannot be continued without causality anyway (the op refuses).
        """
        batch, length, _ = x.shape
        lr = self.base_lr * torch.sigmoid(self.lr_gate(x)).transpose(1, 2) / self.head_dim  # [B, H, T]
        if mask is not None:
            lr = lr * mask[:, None, :].to(lr.dtype)
        token_eta = self.token_eta()
        if self.causal:
            return lr, token_eta
        lengths = mask.sum(dim=1) if mask is not None else torch.full((batch,), length, device=x.device)
        # the op computes in at least float32: scale there, so a half-precision lr is rounded once
        lr = lr.to(torch.promote_types(lr.dtype, torch.float32))
        lr = lr * final_token_eta(token_eta, lengths, length)[:, None, :]
        return lr, torch.ones_like(token_eta)

    def _query_key(self, x: Tensor, state: TTTLayerState, mask: Tensor | None):
        """q, k ``[B, H, T, D]`` and the new conv caches."""
        if not self.share_qk:
            q, k = self.q_proj(x), self.k_proj(x)
            return split_heads(q, self.num_heads), split_heads(k, self.num_heads), None, None
        shared = self.q_proj(x)
        q, conv_q = self.conv_q(shared, state.conv_q, mask)
        k, conv_k = self.conv_k(shared, state.conv_k, mask)
        return split_heads(q, self.num_heads), split_heads(k, self.num_heads), conv_q, conv_k

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, mini_batch_size={self.mini_batch_size}, "
                f"base_lr={self.base_lr}, share_qk={self.share_qk}, use_gate={self.g_proj is not None}, "
                f"token_eta_base={self.token_eta_base!r}, rope={self.rope}, "
                f"learn_token_eta={self.token_eta_offset.requires_grad}, "
                f"causal={self.causal}, impl={self.impl!r}, decode_impl={self.decode_impl!r}")  # fmt: skip


class TTTLinear(_TTTLayer):
    """TTT-Linear: the fast model is ``x + LN(x W + b)`` per head, updated by mini-batch GD.

    Args:
        dim: model width C.
        num_heads: H (``dim % num_heads == 0``; D = C / H even, for RoPE).
        mini_batch_size: inner mini-batch b. Default: ``16`` (paper §2.7, ttt-lm-pytorch).
        base_lr: inner base learning rate. Default: ``1.0`` (the paper's TTT-Linear setting).
        use_gate: GELU output gate ``gelu_tanh(g_proj(x)) * post_norm(o)``. Default: ``False``
            (Transformer backbone; the (M) variant uses ``True``).
        share_qk: one q/k projection through two causal short convs (the (M) variant). Default: ``False``.
        conv_size: kernel of those convs. Default: ``4`` (ttt-lm-jax ``conv_width``).
        rope_theta: RoPE base. Default: ``10000``.
        causal: ``False`` lets every token of a mini-batch read the weights after the whole mini-batch
            (the non-causal form of the TTT video model, for encoders; cannot decode). Default: ``True``.
        impl: form of ``ttt.ops.ttt_linear`` used by ``forward``. Default: ``"auto"`` (``ttt.ops.forms``):
            the fused Triton kernels on CUDA where they apply, the chunked dual form elsewhere.
        decode_impl: form used by ``step`` and a one-token ``forward``. Default: ``"auto"``: the fused
            Triton decode kernel on CUDA (inference only), the primal ``"recurrent"`` form elsewhere.
        token_eta_base: base of the per-position inner step ``token_eta`` within a mini-batch, before its
            learned offset: ``"harmonic"``, ``1/(i+1)`` (the paper: token i reads the mean gradient of
            tokens 0..i), or ``"constant"``, ``1/b`` (every gradient weighs the same whether read inside
            its mini-batch or after it; the end-of-mini-batch weights are the same). Default:
            ``"harmonic"``.
        rope: RoPE on q, k with positions mod b (the paper). ``False``: no rotary. Default: ``True``.
        learn_token_eta: learn the offsets of ``token_eta`` (ttt-lm-pytorch). ``False`` keeps them at 0, so
            ``token_eta`` stays its base; note that ``token_eta[b-1]`` is also the weight with which each
            mini-batch's gradients enter the weights carried to the next one. Default: ``True``.

    ``last_impl`` records the form the last call ran.

    Examples::

        >>> import torch
        >>> from ttt.layers import TTTLinear
        >>> layer = TTTLinear(dim=64, num_heads=4)
        >>> x = torch.randn(2, 40, 64)
        >>> y, state = layer(x[:, :37])                 # chunked dual form
        >>> y_next, state = layer.step(x[:, 37:38], state)  # primal form, one token
        >>> y.shape, state.position, state.ttt.offset, layer.last_impl
        (torch.Size([2, 37, 64]), 38, 6, 'recurrent')
    """

    op = "ttt_linear"

    def __init__(self, dim: int, num_heads: int, *, base_lr: float = 1.0, **kwargs) -> None:
        super().__init__(dim, num_heads, base_lr=base_lr, **kwargs)
        self.W0 = nn.Parameter(torch.randn(num_heads, self.head_dim, self.head_dim) * 0.02)
        self.b0 = nn.Parameter(torch.zeros(num_heads, self.head_dim))

    def fast_weights(self) -> tuple[Tensor, Tensor]:
        """``(W0 [H, D, D], b0 [H, D])``."""
        return self.W0, self.b0

    def _op(self, q, k, v, lr, **kwargs):
        return self._call(ttt.ops.ttt_linear, q, k, v, lr, **kwargs)


class TTTMLP(_TTTLayer):
    """TTT-MLP: the fast model is ``x + LN(gelu_tanh(x W1 + b1) W2 + b2)`` per head, hidden M = 4 D.

    Arguments as :class:`TTTLinear`, except:
        base_lr: Default: ``0.1`` (the paper's TTT-MLP setting; the paper also warms it up from 0.01, which is
            a training-recipe matter).
        hidden_mult: M / D. Default: ``4`` (ttt-lm-pytorch).
        decode_impl: Default: ``"auto"``: the fused Triton decode kernel on CUDA, a T = 1 chunk call
            elsewhere.
    """

    op = "ttt_mlp"

    def __init__(
        self, dim: int, num_heads: int, *, base_lr: float = 0.1, hidden_mult: int = 4, **kwargs
    ) -> None:
        super().__init__(dim, num_heads, base_lr=base_lr, **kwargs)
        hidden = hidden_mult * self.head_dim
        # W2 ~ N(0, 0.02) too, after ttt-lm-jax commit ac8cdc8 "Fix TTT MLP Init"
        self.W1 = nn.Parameter(torch.randn(num_heads, self.head_dim, hidden) * 0.02)
        self.b1 = nn.Parameter(torch.zeros(num_heads, hidden))
        self.W2 = nn.Parameter(torch.randn(num_heads, hidden, self.head_dim) * 0.02)
        self.b2 = nn.Parameter(torch.zeros(num_heads, self.head_dim))

    def fast_weights(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(W1 [H, D, M], b1 [H, M], W2 [H, M, D], b2 [H, D])``."""
        return self.W1, self.b1, self.W2, self.b2

    def _op(self, q, k, v, lr, **kwargs):
        return self._call(ttt.ops.ttt_mlp, q, k, v, lr, **kwargs)
