"""KV-binding TTT as a sequence mixer, with the ablation switches of Liu et al. (2026, arXiv 2602.21204,
Sec. 6), over ``ttt.ops.kv_binding``.

A LaCT-style layer: per head a SwiGLU fast weight ``f(x) = (silu(x W0) * (x W2)) W1`` trained online (one
step per token, read after the step) on the dot-product loss ``-<f(k), v>`` with a learned per-token inner
learning rate. When only the last layer ``W1`` is trained, the layer *is* causal linear attention over the
features ``phi(x) = silu(x W0) * (x W2)`` from the initial state ``W1`` (Thm 5.2), which the ``"parallel"``
form evaluates chunk-parallel; the ``"recurrent"`` form runs the TTT recurrence itself, token by token
(``lact_online``: the inner gradient written out, tested against ``lact_recurrent``'s from ``torch.func``),
so both forms run in the same model. Derivation:
ttt/ops/kv_binding/README.md.

Shapes: B batch, T tokens, C model width, H heads, D head dim C/H, M fast-weight hidden width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ttt.layers.base import RecurrentMixer
from ttt.layers.protocol import merge_heads, split_heads
from ttt.modules.norm import RMSNorm
from ttt.ops._checks import check_coefficient, gates_computed_by
from ttt.ops.kv_binding import kv_binding_parallel, lact_online, reduce_kv_binding, swiglu_features

#: inner models: LaCT's SwiGLU fast weight, or one linear map (features ``phi(x) = x``)
INNER_MODELS = ("swiglu", "linear")


@dataclass(frozen=True)
class KVBindingState:
    """The state of a :class:`KVBinding` layer after a prefix.

    Attributes:
        W: the last layer's fast weight ``[B, H, M, D]`` (float32, float64 for float64 inputs), or ``None``
            before the first token (the layer then starts from its learned ``W1``, so gradients reach it).
        V: the inner momentum buffer ``[B, H, M, D]`` (``None``: zeros).
        lengths: ``[B]`` int64, real tokens seen per row.
        final: False after a ``"recurrent"``-form call, which returns no fast weights: such a state cannot be
            continued (``forward`` and ``step`` refuse it).
    """

    W: Tensor | None
    V: Tensor | None
    lengths: Tensor
    final: bool = True

    def detach(self) -> KVBindingState:
        """The same state cut from the autograd graph (truncated backprop through time)."""
        cut = lambda t: None if t is None else t.detach()  # noqa: E731
        return KVBindingState(cut(self.W), cut(self.V), self.lengths, self.final)

    def nbytes(self) -> int:
        """Bytes of the recurrent state (fast weight and momentum buffer)."""
        return sum(t.numel() * t.element_size() for t in (self.W, self.V) if t is not None)


class KVBinding(RecurrentMixer):
    """TTT with KV binding (LaCT-style SwiGLU fast weight, dot-product loss, online steps) and the ablation
    switches of Liu et al. (2026).

    Per head: q, k, v from bias-free projections, q and k L2-normalised (LaCT); inner learning rate
    ``lr_t = base_lr * sigmoid(x_t w_h + b_h) / M``; fast weight ``f`` as in the module docstring with
    learned initial ``W0, W2 [H, D, M]`` and ``W1 [H, M, D]``; output ``o_t = f_t(q_t)`` after the step on
    token t, then a per-head RMSNorm and the output projection.

    Args:
        dim: model width C.
        num_heads: H (``dim % num_heads == 0``).
        inner: ``"swiglu"`` (LaCT's fast weight) or ``"linear"`` (one map ``f(x) = x W1``: plain linear
            attention ``o_t = q_t (W1 + sum_{i <= t} lr_i k_i^T v_i)``, the end of the paper's reduction
            path; it has only the parallel form). Default: ``"swiglu"``.
        hidden_mult: M / D of the SwiGLU fast weight. Default: ``1``.
        update_all: train all three fast weights (W0, W2 too: a dynamic feature map, so no parallel form:
            runs ``"recurrent"``); ``False``: only the last layer W1 (Liu et al.'s Variant 1). Default:
            ``False``.
        weight_norm: after each step rescale every column of each trained fast weight (W1; W0 and W2 too
            with ``update_all``) to its initial norm (LaCT; breaks the parallel form). Default: ``False``.
        ascent: gradient ascent on the inner loss. Default: ``False``.
        q_from_k: read with the key, ``o_t = f_t(k_t)`` (no query projection). Default: ``False``.
        inner_steps: gradient steps per token, all on that token. Default: ``1``.
        momentum: inner momentum mu in [0, 1) (``U_t = mu U_{t-1} + step``). Default: ``0.0``.
        token_lr: learn the per-token inner lr gate; ``False``: the constant ``lr = base_lr / M`` (the
            paper's "no per-token lr"). Default: ``True``.
        base_lr: inner base learning rate. Default: ``1.0``.
        impl: ``"parallel"`` (chunk-parallel linear attention), ``"recurrent"`` (the TTT recurrence,
            ``lact_online``; whole sequences from the learned initial weights: its state cannot be
            continued) or ``"auto"``: parallel where the switches allow, else recurrent. Default: ``"auto"``.
        decode_impl: form in a one-token ``forward`` and in ``step``: as ``impl``. ``step`` needs the
            parallel form (it carries ``W1`` and the momentum buffer): with ``update_all`` or ``weight_norm``
            (or ``decode_impl="recurrent"``) it raises. Default: ``"auto"``.
        chunk_size: tokens per chunk of the parallel form. Default: ``64``.

    ``forward(x [B, T, C], state=None, mask=None) -> (y, KVBindingState)``. Padded tokens (``mask`` False,
    right padding) get inner lr 0, so they write nothing, and each row's state is that of its unpadded
    sequence (with momentum, whose buffer would keep moving the weights over padding, the state is computed
    from each row's real tokens).

    Examples::

        >>> import torch
        >>> from ttt.layers import KVBinding
        >>> layer = KVBinding(dim=64, num_heads=4)
        >>> x = torch.randn(2, 40, 64)
        >>> y, state = layer(x[:, :39])                  # chunk-parallel linear attention
        >>> y_next, state = layer.step(x[:, 39:40], state)
        >>> y.shape, state.W.shape, layer.last_impl
        (torch.Size([2, 39, 64]), torch.Size([2, 4, 16, 16]), 'parallel')
    """

    op = "kv_binding"
    state_type = KVBindingState

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        inner: str = "swiglu",
        hidden_mult: int = 1,
        update_all: bool = False,
        weight_norm: bool = False,
        ascent: bool = False,
        q_from_k: bool = False,
        inner_steps: int = 1,
        momentum: float = 0.0,
        token_lr: bool = True,
        base_lr: float = 1.0,
        impl: str = "auto",
        decode_impl: str = "auto",
        chunk_size: int = 64,
    ) -> None:
        super().__init__(dim, num_heads, impl=impl, decode_impl=decode_impl)
        name = type(self).__name__
        switches = dict(update_all=update_all, weight_norm=weight_norm, ascent=ascent, q_from_k=q_from_k,
                        token_lr=token_lr)  # fmt: skip
        for key, value in switches.items():  # a JSON "yes" or 0 from --mixer-kwargs must not pass as a bool
            if not isinstance(value, bool):
                raise ValueError(f"{name}: {key} must be True or False, got {value!r}")
        if inner not in INNER_MODELS:
            raise ValueError(f"{name}: inner must be one of {INNER_MODELS}, got {inner!r}")
        for key, value in dict(
            hidden_mult=hidden_mult, inner_steps=inner_steps, chunk_size=chunk_size
        ).items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: {key} must be a positive int, got {value!r}")
        if isinstance(base_lr, bool) or not isinstance(base_lr, (int, float)) or not base_lr > 0:
            raise ValueError(f"{name}: base_lr must be a number > 0, got {base_lr!r}")
        self.momentum = check_coefficient("momentum", momentum, high_open=True)
        needs_recurrent = [k for k in ("update_all", "weight_norm") if switches[k]]
        if inner == "linear" and (needs_recurrent or "recurrent" in (self.impl, self.decode_impl)):
            raise ValueError(
                f"{name}: inner='linear' is linear attention itself: it has only the parallel form and no "
                f"layer but W1 to update; got update_all={update_all}, weight_norm={weight_norm}, "
                f"impl={impl!r}, decode_impl={decode_impl!r}"
            )
        if needs_recurrent:
            for key in ("impl", "decode_impl"):
                if getattr(self, key) == "parallel":
                    raise ValueError(
                        f"{name}: {' and '.join(needs_recurrent)} break(s) the parallel form (the features "
                        f"or the scale of W1 change with every step): {key} must be 'recurrent' or 'auto'"
                    )
                setattr(self, key, "recurrent")
        self.inner, self.update_all, self.weight_norm = inner, update_all, weight_norm
        self.ascent, self.q_from_k, self.inner_steps = ascent, q_from_k, inner_steps
        self.base_lr, self.chunk_size = float(base_lr), chunk_size
        self.head_dim = D = dim // num_heads
        self.hidden = M = hidden_mult * D if inner == "swiglu" else D

        self.q_proj = None if q_from_k else nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)
        # inner learning-rate gate: one linear unit per head on x, N(0, 0.02) weights, zero bias (as TTT)
        self.lr_gate = nn.Linear(dim, num_heads) if token_lr else None
        if self.lr_gate is not None:
            nn.init.normal_(self.lr_gate.weight, std=0.02)
            nn.init.zeros_(self.lr_gate.bias)
        # q, k have unit norm, so x W0 and x W2 start with unit-variance entries; W1 keeps f(x) O(1)
        if inner == "swiglu":
            self.W0 = nn.Parameter(torch.randn(num_heads, D, M))
            self.W2 = nn.Parameter(torch.randn(num_heads, D, M))
        self.W1 = nn.Parameter(torch.randn(num_heads, M, D) * M**-0.5)
        self.o_norm = RMSNorm(D)

    def init_state(self, batch_size: int, device=None, dtype=None) -> KVBindingState:
        """The state before the first token: the learned ``W1`` (``W=None``), zero momentum."""
        device = device or self.W1.device
        return KVBindingState(None, None, torch.zeros(batch_size, dtype=torch.long, device=device))

    def step(self, x_t: Tensor, state: KVBindingState) -> tuple[Tensor, KVBindingState]:
        """One decoding step with the parallel form (``x_t [B, 1, C]``); refused where the switches leave
        only the recurrent form, which carries no fast weights from one call to the next."""
        if self.decode_impl == "recurrent":
            raise ValueError(
                f"{type(self).__name__}: decoding needs the parallel form (it carries W1 and the momentum "
                "buffer); with decode_impl='recurrent' (update_all, weight_norm) run whole sequences instead"
            )
        return super().step(x_t, state)

    def _features(self):
        """``phi``: ``[B, H, T, D] -> [B, H, T, M]``."""
        if self.inner == "linear":
            return lambda x: x
        return swiglu_features(self.W0, self.W2)

    def _run(self, x: Tensor, state: KVBindingState, mask: Tensor | None, decode: bool):
        name = type(self).__name__
        if not state.final:
            raise ValueError(
                f"{name}: this state comes from the 'recurrent' form, which returns no fast weights: "
                "continue with the parallel form (impl='parallel') or run the whole sequence in one call"
            )
        batch, length, _ = x.shape
        k = F.normalize(split_heads(self.k_proj(x), self.num_heads), dim=-1)  # [B, H, T, D]
        q = k if self.q_proj is None else F.normalize(split_heads(self.q_proj(x), self.num_heads), dim=-1)
        v = split_heads(self.v_proj(x), self.num_heads)
        # under autocast the projections are bf16: the fast weights and their sums stay in float32
        dtype = torch.promote_types(q.dtype, torch.float32)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        lr = self._inner_lr(x, mask, dtype)  # [B, H, T], 0 on padding
        impl = self._form(q, decode)
        settings = dict(ascent=self.ascent, inner_steps=self.inner_steps, momentum=self.momentum)
        lengths = state.lengths + (mask.sum(dim=1) if mask is not None else length)
        # the features and the fast weights stay in float32 under autocast (its einsum would round to bf16)
        with gates_computed_by(name), torch.autocast(x.device.type, enabled=False):
            if impl == "recurrent":
                if state.W is not None:
                    raise ValueError(
                        f"{name}: impl='recurrent' runs whole sequences from the learned initial weights; "
                        "pass state=None (or a fresh init_state)"
                    )
                params = tuple(p.to(dtype) for p in (self.W0, self.W1, self.W2))
                o = lact_online(q, k, v, params, lr=lr, update_all=self.update_all,
                                   weight_norm=self.weight_norm, **settings)  # fmt: skip
                new = KVBindingState(None, None, lengths, final=False)
            else:
                o, (W, V) = self._parallel(q, k, v, lr, state, **settings)
                if mask is not None and self.momentum and not bool(mask.all()):
                    W, V = self._rows_state(q, k, v, lr, state, mask, settings)
                new = KVBindingState(W, V, lengths)
        y = self.o_norm(o)  # [B, H, T, D]
        return self.o_proj(merge_heads(y).to(x.dtype)), new

    def _parallel(self, q: Tensor, k: Tensor, v: Tensor, lr: Tensor, state: KVBindingState, **settings):
        """The parallel form from ``state``: ``(o [B, H, T, D], (W, V))``."""
        eff = reduce_kv_binding(q, k, v, features=self._features(), lr=lr, **settings)
        W0 = state.W if state.W is not None else self.W1.to(q.dtype)[None]
        return kv_binding_parallel(
            eff, W0, velocity=state.V, chunk_size=self.chunk_size, output_final_state=True
        )

    def _rows_state(self, q, k, v, lr, state: KVBindingState, mask: Tensor, settings: dict):
        """Each row's ``(W, V)`` after its real tokens only: with momentum, padding (no write) would still
        move the weights by the buffer."""
        Ws, Vs = [], []
        for row, n in enumerate(mask.sum(dim=1).tolist()):
            one = slice(row, row + 1)
            sub = KVBindingState(
                *(None if t is None else t[one] for t in (state.W, state.V)), state.lengths[one]
            )
            real = [t[one, :, :n] for t in (q, k, v, lr)]
            _, (W, V) = self._parallel(*real, sub, **settings)
            Ws.append(W)
            Vs.append(V)
        return torch.cat(Ws), torch.cat(Vs)

    def _inner_lr(self, x: Tensor, mask: Tensor | None, dtype: torch.dtype) -> Tensor:
        """``lr [B, H, T]`` in ``dtype``: ``base_lr * sigmoid(gate) / M`` (``base_lr / M`` without
        ``token_lr``), 0 on padding."""
        batch, length, _ = x.shape
        scale = self.base_lr / self.hidden
        if self.lr_gate is None:
            lr = torch.full((batch, self.num_heads, length), scale, device=x.device, dtype=dtype)
        else:
            lr = scale * torch.sigmoid(self.lr_gate(x).to(dtype)).transpose(1, 2)
        return lr if mask is None else lr * mask[:, None, :].to(dtype)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, inner={self.inner!r}, hidden={self.hidden}, "
                f"update_all={self.update_all}, weight_norm={self.weight_norm}, ascent={self.ascent}, "
                f"q_from_k={self.q_from_k}, inner_steps={self.inner_steps}, momentum={self.momentum}, "
                f"token_lr={self.lr_gate is not None}, base_lr={self.base_lr}, impl={self.impl!r}, "
                f"decode_impl={self.decode_impl!r}")  # fmt: skip
