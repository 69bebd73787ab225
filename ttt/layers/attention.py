"""Causal multi-head softmax attention (SDPA + RoPE) with a KV cache: the baseline mixer.

Shapes: B batch, T new tokens, S cached tokens, C model width, H query heads, G key/value heads, D head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ttt.layers.protocol import check_input, check_mask, merge_heads, param_dtype, split_heads
from ttt.modules.conv import ShortConv
from ttt.modules.rotary import apply_rotary, check_rope_theta, rotary_cos_sin


@dataclass(frozen=True)
class KVCache:
    """The state of :class:`Attention` after a prefix.

    Attributes:
        k, v: cached keys (RoPE applied) and values ``[B, G, S, D]``.
        positions: position of each cached token ``[B, S]`` (int64).
        valid: ``[B, S]`` bool, False for cached padding (never attended to).
        lengths: ``[B]`` int64, real tokens seen per row; the next token of a row sits at this position.
        convs: the short convolutions' caches of q, k, v ``[B, width, K - 1]`` (``()`` without them).
    """

    k: Tensor
    v: Tensor
    positions: Tensor
    valid: Tensor
    lengths: Tensor
    convs: tuple[Tensor, ...] = ()

    def detach(self) -> KVCache:
        convs = tuple(c.detach() for c in self.convs)
        return KVCache(self.k.detach(), self.v.detach(), self.positions, self.valid, self.lengths, convs)

    def nbytes(self) -> int:
        """Bytes held by the cache (keys, values and convolution caches), for state-size comparisons."""
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, *self.convs))


@dataclass(frozen=True)
class WindowSplit:
    """Full causal softmax attention split at a window (:meth:`SoftmaxAttention.window_split`).

    Attributes:
        lse_window, lse_far: ``[B, H, T]`` logs of the normalisers over the keys the window (and the sinks)
            sees and over the keys beyond it (``-inf`` where there are none).
        n_far: ``[T]`` int64, the number of keys beyond the window and the sinks.
        out_window, out_full: ``[B, H, T, D]`` the window's softmax output and the full one (before o_proj).
    """

    lse_window: Tensor
    lse_far: Tensor
    n_far: Tensor
    out_window: Tensor
    out_full: Tensor


class SoftmaxAttention(nn.Module):
    """Causal softmax attention with rotary positions, as in Llama (and the TTT paper's Transformer baseline).

    Args:
        dim: model width C.
        num_heads: H; ``dim % num_heads == 0``, head dim D = C / H (even, for RoPE).
        num_kv_heads: G key/value heads (grouped-query attention, Ainslie et al. 2023).
            Default: ``num_heads``.
        window: sliding window W: a token attends to itself and the W - 1 tokens before it, and the cache
            keeps only what the next token can see (constant-size state, for hybrids). Default: ``None``
            (full causal attention).
        sink: with a window, the first ``sink`` tokens of the sequence stay visible to every query beside
            the window, and in the cache (StreamingLLM's attention sinks, Xiao et al. 2023, arXiv
            2309.17453: a pretrained model's heads park attention on the first tokens, and a window that
            drops them changes what the heads compute). Default: ``0``.
        rope_theta: RoPE base. Default: ``10000`` (ttt-lm-pytorch ``rope_theta``).
        bias: bias in the q/k/v/o projections. Default: ``False`` (Llama, TTT baseline).
        conv_size: kernel K of causal depthwise short convolutions on the q, k and v projections (no
            activation), as the recurrent mixers have; ``0`` for none. Zoology's recall configs give every
            mixer a short convolution: one lets a single attention layer bind a key to its neighbour.
            Default: ``0`` (Llama).
        far_gate: with a window, scale each head's output by the window's estimated share of the full
            softmax, ``alpha = Z_w / (Z_w + Z_far)``: ``Z_w`` the window's normaliser (exact), ``Z_far`` the
            mass the keys beyond it would get, estimated as ``n_far * exp(b_h + u_h . x)`` (``n_far`` keys
            lie beyond the window and the sinks; ``b`` [H] and ``u`` [H, C] learned, ``u`` from zero). A
            window cut from a full attention thus gives back the weight its far keys held, as the shared
            normaliser of LoLCATs' hybrid layer does (derivation: docs/convert.md). The gated layer writes
            its softmax out (SDPA does not return the normaliser): ``[B, H, T, S]`` scores in memory, as
            SDPA's math path on a CPU, where a fused GPU kernel would not. Default: ``False``.

    Examples::

        >>> import torch
        >>> from ttt.layers import SoftmaxAttention
        >>> layer = SoftmaxAttention(dim=64, num_heads=4)
        >>> x = torch.randn(2, 10, 64)
        >>> y, cache = layer(x[:, :9])               # prefill
        >>> y_last, cache = layer.step(x[:, 9:], cache)  # decode one token
        >>> y.shape, y_last.shape, cache.k.shape
        (torch.Size([2, 9, 64]), torch.Size([2, 1, 64]), torch.Size([2, 4, 10, 16]))
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        num_kv_heads: int | None = None,
        window: int | None = None,
        sink: int = 0,
        rope_theta: float = 10000.0,
        bias: bool = False,
        conv_size: int = 0,
        far_gate: bool = False,
    ) -> None:
        super().__init__()
        num_kv_heads = num_kv_heads or num_heads
        if dim % num_heads or num_heads % num_kv_heads:
            raise ValueError(
                f"need dim % num_heads == 0 and num_heads % num_kv_heads == 0, got "
                f"dim={dim}, num_heads={num_heads}, num_kv_heads={num_kv_heads}"
            )
        if (dim // num_heads) % 2:
            raise ValueError(f"head dim dim/num_heads must be even for RoPE, got {dim // num_heads}")
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
            raise ValueError(f"window must be None or an int >= 1, got {window!r}")
        if isinstance(sink, bool) or not isinstance(sink, int) or sink < 0 or (sink and window is None):
            raise ValueError(
                f"sink must be an int >= 0, and 0 without a window; got sink={sink!r}, window={window}"
            )
        if isinstance(conv_size, bool) or not isinstance(conv_size, int) or conv_size < 0:
            raise ValueError(f"conv_size must be an int >= 0 (0: no short convolutions), got {conv_size!r}")
        if not isinstance(far_gate, bool) or (far_gate and window is None):
            raise ValueError(
                f"far_gate must be a bool, and False without a window; got far_gate={far_gate!r}, "
                f"window={window}"
            )
        self.dim, self.num_heads, self.num_kv_heads = dim, num_heads, num_kv_heads
        self.head_dim = dim // num_heads
        self.window, self.sink, self.rope_theta = window, sink, check_rope_theta(rope_theta)
        self.q_proj = nn.Linear(dim, dim, bias=bias)
        self.k_proj = nn.Linear(dim, num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(dim, dim, bias=bias)
        kv_width = num_kv_heads * self.head_dim
        self.conv_size = conv_size
        self.convs = nn.ModuleList(
            [ShortConv(w, conv_size) for w in (dim, kv_width, kv_width)] if conv_size else []
        )
        self.far_gate = far_gate
        if far_gate:  # log of the mass per far key: b_h + u_h . x (module docstring)
            self.far_bias = nn.Parameter(torch.zeros(num_heads))
            self.far_proj = nn.Linear(dim, num_heads, bias=False)
            nn.init.zeros_(self.far_proj.weight)

    def init_state(self, batch_size: int, device=None, dtype=None) -> KVCache:
        """An empty cache for ``batch_size`` sequences."""
        device = device or self.q_proj.weight.device
        dtype = dtype or self.q_proj.weight.dtype
        empty = torch.zeros(batch_size, self.num_kv_heads, 0, self.head_dim, device=device, dtype=dtype)
        return KVCache(
            k=empty,
            v=empty.clone(),
            positions=torch.zeros(batch_size, 0, dtype=torch.long, device=device),
            valid=torch.zeros(batch_size, 0, dtype=torch.bool, device=device),
            lengths=torch.zeros(batch_size, dtype=torch.long, device=device),
            convs=tuple(c.init_cache(batch_size, device=device, dtype=dtype) for c in self.convs),
        )

    def forward(
        self, x: Tensor, state: KVCache | None = None, mask: Tensor | None = None
    ) -> tuple[Tensor, KVCache]:
        """Attend over the cache and the new tokens.

        Args:
            x: ``[B, T, C]``.
            state: a :class:`KVCache` from ``init_state`` or a previous call, or ``None`` (sequence start).
            mask: ``[B, T]`` bool, True = real token (right padding). Padded tokens are never attended to
                and do not advance the positions, so a padded batch matches the unpadded sequences.

        Returns:
            ``(y [B, T, C], KVCache)``.
        """
        name = type(self).__name__
        check_input(name, x, self.dim, dtype=param_dtype(self))
        mask = check_mask(name, mask, x)
        batch, length, _ = x.shape
        fresh = state is None  # a sequence start: positions from 0
        if fresh:
            state = self.init_state(batch, device=x.device, dtype=x.dtype)
        else:
            self._check_state(state, batch)
        projected, convs = self._project(x, state.convs, mask)
        q = split_heads(projected[0], self.num_heads)  # [B, H, T, D]
        k = split_heads(projected[1], self.num_kv_heads)  # [B, G, T, D]
        v = split_heads(projected[2], self.num_kv_heads)
        steps = torch.arange(length, device=x.device)
        if fresh:
            positions = steps.expand(batch, length)
            cos, sin = rotary_cos_sin(steps, self.head_dim, theta=self.rope_theta)  # [T, D/2]
        else:
            positions = state.lengths[:, None] + steps  # [B, T]
            cos, sin = rotary_cos_sin(positions, self.head_dim, theta=self.rope_theta)  # [B, 1, T, D/2]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

        valid_new = mask if mask is not None else torch.ones(batch, length, dtype=torch.bool, device=x.device)
        keys = torch.cat([state.k.to(k.dtype), k], dim=2)  # [B, G, S+T, D]
        values = torch.cat([state.v.to(v.dtype), v], dim=2)
        key_positions = torch.cat([state.positions, positions], dim=1)  # [B, S+T]
        key_valid = torch.cat([state.valid, valid_new], dim=1)

        if state.k.shape[2] == 0 and mask is None and self.window is None:
            o = self._sdpa(q, keys, values, None, is_causal=True)
        elif self.far_gate:
            allowed = self._allowed(positions, key_positions, key_valid, cached=state.k.shape[2])
            o, lse = self._attend_lse(q, keys, values, allowed[:, None])
            o = o * self.window_share(x, lse, positions)[..., None]
        else:
            allowed = self._allowed(positions, key_positions, key_valid, cached=state.k.shape[2])
            o = self._sdpa(q, keys, values, allowed[:, None], is_causal=False)
        y = self.o_proj(merge_heads(o))

        lengths = state.lengths + valid_new.sum(dim=1)
        return y, self._trim(KVCache(keys, values, key_positions, key_valid, lengths, convs))

    def _project(
        self, x: Tensor, caches: tuple[Tensor, ...], mask: Tensor | None
    ) -> tuple[list[Tensor], tuple[Tensor, ...]]:
        """The q, k, v projections ``[B, T, width]`` (through the short convolutions when the layer has
        them) and the convolutions' new caches."""
        projected = [self.q_proj(x), self.k_proj(x), self.v_proj(x)]
        if not self.convs:
            return projected, ()
        pairs = [conv(p, cache, mask) for conv, p, cache in zip(self.convs, projected, caches, strict=True)]
        return [y for y, _ in pairs], tuple(c for _, c in pairs)

    def step(self, x_t: Tensor, state: KVCache | None) -> tuple[Tensor, KVCache]:
        """One decoding step: ``x_t [B, 1, C]`` -> ``(y [B, 1, C], KVCache)``."""
        check_input(f"{type(self).__name__}.step", x_t, self.dim, step=True, dtype=param_dtype(self))
        return self.forward(x_t, state)

    def _allowed(self, q_pos: Tensor, k_pos: Tensor, k_valid: Tensor, *, cached: int) -> Tensor:
        """``[B, T, S+T]`` bool: which keys each new query may attend to."""
        allowed = k_valid[:, None, :] & (k_pos[:, None, :] <= q_pos[:, :, None])
        if self.window is not None:
            allowed &= (q_pos[:, :, None] - k_pos[:, None, :] < self.window) | (k_pos[:, None, :] < self.sink)
        # a padded query may have no real key in reach; letting it see itself avoids an all -inf row (NaN)
        length = q_pos.shape[1]
        diagonal = torch.zeros_like(allowed)
        diagonal[:, torch.arange(length), cached + torch.arange(length)] = True
        return allowed | diagonal

    def _sdpa(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, *, is_causal: bool) -> Tensor:
        if self.num_kv_heads != self.num_heads:
            repeats = self.num_heads // self.num_kv_heads
            k, v = k.repeat_interleave(repeats, dim=1), v.repeat_interleave(repeats, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)

    def _attend_lse(self, q: Tensor, k: Tensor, v: Tensor, allowed: Tensor) -> tuple[Tensor, Tensor]:
        """:func:`softmax_lse` with the key/value heads repeated for grouped queries."""
        if self.num_kv_heads != self.num_heads:
            repeats = self.num_heads // self.num_kv_heads
            k, v = k.repeat_interleave(repeats, dim=1), v.repeat_interleave(repeats, dim=1)
        return softmax_lse(q, k, v, allowed)

    def window_share(self, x: Tensor, lse: Tensor, positions: Tensor) -> Tensor:
        """The far gate ``alpha [B, H, T]`` (class docstring) of queries ``x [B, T, C]`` at ``positions
        [B, T]`` (or ``[T]``) whose window normalisers are ``exp(lse [B, H, T])``: 1 where no key lies
        beyond the window and the sinks."""
        far = self.far_keys(positions)
        log_far = self.far_bias[:, None] + self.far_proj(x).transpose(1, 2)  # [B, H, T]
        logit = lse - log_far - far.to(lse.dtype).clamp(min=1).log().unsqueeze(-2)
        return torch.where((far > 0).unsqueeze(-2), torch.sigmoid(logit), torch.ones_like(logit))

    def far_keys(self, positions: Tensor) -> Tensor:
        """How many keys lie beyond the window and the sinks of a query at each of ``positions`` (int64)."""
        return (positions + 1 - self.window - self.sink).clamp(min=0)

    @torch.no_grad()
    def window_split(self, x: Tensor) -> WindowSplit:
        """The full causal softmax attention of ``x [B, T, C]`` (one sequence start, no padding) split at
        this layer's window: a :class:`WindowSplit`. Fits the far gate to a full-attention teacher whose
        projections the layer holds (``ttt convert --far-gate``)."""
        if self.window is None:
            raise ValueError("window_split splits the softmax at the window: the layer has none")
        caches = tuple(c.init_cache(x.shape[0], device=x.device, dtype=x.dtype) for c in self.convs)
        projected, _ = self._project(x, caches, None)
        q = split_heads(projected[0], self.num_heads)
        k = split_heads(projected[1], self.num_kv_heads)
        v = split_heads(projected[2], self.num_kv_heads)
        steps = torch.arange(x.shape[1], device=x.device)
        cos, sin = rotary_cos_sin(steps, self.head_dim, theta=self.rope_theta)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if self.num_kv_heads != self.num_heads:
            repeats = self.num_heads // self.num_kv_heads
            k, v = k.repeat_interleave(repeats, dim=1), v.repeat_interleave(repeats, dim=1)
        scores = (q @ k.transpose(-1, -2)) * self.head_dim**-0.5  # [B, H, T, T], computed once
        causal = steps[None, :] <= steps[:, None]
        positions = steps[None]  # the forward's own rule of what the window and the sinks see
        near = self._allowed(positions, positions, torch.ones_like(positions, dtype=torch.bool), cached=0)[0]
        out_full, _ = _attend_scores(scores, causal, v)
        out_window, lse_window = _attend_scores(scores, near, v)
        lse_far = torch.logsumexp(scores.masked_fill(near | ~causal, float("-inf")), dim=-1)
        n_far = self.far_keys(steps)
        return WindowSplit(lse_window, lse_far, n_far, out_window, out_full)

    def _trim(self, cache: KVCache) -> KVCache:
        """Drop cached tokens that no later query can reach (sliding window only)."""
        if self.window is None or cache.k.shape[2] == 0:
            return cache
        # the next query of row b sits at lengths[b]; later queries see even less (but the sink tokens)
        needed = cache.valid & (cache.positions > cache.lengths[:, None] - self.window)  # [B, S]
        if self.sink:
            return self._keep(cache, needed | (cache.valid & (cache.positions < self.sink)))
        if not needed.any():
            start = cache.k.shape[2]
        else:
            start = int(needed.float().argmax(dim=1).masked_fill(~needed.any(dim=1), cache.k.shape[2]).min())
        if start == 0:
            return cache
        return KVCache(
            cache.k[:, :, start:],
            cache.v[:, :, start:],
            cache.positions[:, start:],
            cache.valid[:, start:],
            cache.lengths,
            cache.convs,
        )

    @staticmethod
    def _keep(cache: KVCache, needed: Tensor) -> KVCache:
        """``cache`` without the columns that no row needs (``needed [B, S]`` bool)."""
        keep = needed.any(dim=0)
        if bool(keep.all()):
            return cache
        cols = keep.nonzero()[:, 0]
        return KVCache(
            cache.k[:, :, cols],
            cache.v[:, :, cols],
            cache.positions[:, cols],
            cache.valid[:, cols],
            cache.lengths,
            cache.convs,
        )

    def _check_state(self, state: KVCache, batch: int) -> None:
        if not isinstance(state, KVCache):
            raise TypeError(
                f"Attention: state must be a KVCache (from init_state or forward), got {type(state).__name__}"
            )
        if len(state.convs) != len(self.convs):
            raise ValueError(
                f"Attention: state holds {len(state.convs)} convolution caches but the layer has "
                f"{len(self.convs)} (conv_size={self.conv_size}): a state from another layer"
            )
        if state.k.shape[0] != batch or state.k.shape[1] != self.num_kv_heads:
            raise ValueError(
                f"Attention: state holds [B={state.k.shape[0]}, G={state.k.shape[1]}] but the "
                f"input has B={batch} and the layer G={self.num_kv_heads}"
            )


class SlidingWindowAttention(SoftmaxAttention):
    """:class:`Attention` with a sliding window, for hybrid models (the ``"swa"`` mixer).

    Args:
        window: tokens each query sees, itself included. Default: ``512`` (a size for small-context
            models on CPU; Samba, arXiv 2406.07522, uses 2048 at 4k context).
        Other arguments as :class:`Attention`.
    """

    def __init__(self, dim: int, num_heads: int, *, window: int = 512, **kwargs) -> None:
        if window is None:
            raise ValueError("SlidingWindowAttention needs a window (use Attention for full attention)")
        super().__init__(dim, num_heads, window=window, **kwargs)


def softmax_lse(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor) -> tuple[Tensor, Tensor]:
    """Softmax attention written out (for the far gate; SDPA does not return the normaliser): ``q [B, H,
    T, D]``, ``k, v [B, H, S, D]``, ``allowed`` bool broadcasting to ``[B, H, T, S]`` (a key in every row)
    -> ``(o [B, H, T, D], lse [B, H, T])``, ``lse`` the log of each row's normaliser."""
    return _attend_scores((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5, allowed, v)


def _attend_scores(scores: Tensor, allowed: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`softmax_lse` from its scaled scores ``[B, H, T, S]``."""
    masked = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(masked, dim=-1) @ v, torch.logsumexp(masked, dim=-1)


# the former name of the softmax layer, kept for old imports (``ttt.attention`` is the TTT operator)
Attention = SoftmaxAttention


# --- preallocated decoding: a KV cache written in place (no torch.cat per token), CUDA-graph friendly ---


@dataclass(frozen=True)
class StaticKVCache:
    """A preallocated KV cache of :class:`SoftmaxAttention` for decoding, updated in place by
    :func:`attention_decode_step_`: no allocation and no host synchronisation per token, so a decode step
    can be captured in a CUDA graph. Every row of the batch is at the same position.

    Attributes:
        k, v: ``[B, G, S, D]`` buffers; full attention: S = the most tokens the cache can hold, rounded up
            to a multiple of 16 (slot = position); sliding window W (and ``sink`` first tokens): the sink
            tokens' slots, then a ring of W slots (slot = position for a sink token, else sink + (position
            - sink) mod W).
        slot_pos: ``[S]`` int64, the position each slot holds (-1: empty).
        position: ``[]`` int64 tensor, the position of the next token.
        convs: the short convolutions' caches ``[B, width, K - 1]``, updated in place (``()`` without).
    """

    k: Tensor
    v: Tensor
    slot_pos: Tensor
    position: Tensor
    convs: tuple[Tensor, ...] = ()

    def nbytes(self) -> int:
        """Bytes held by the key, value and convolution buffers."""
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, *self.convs))


def static_kv_cache(layer: SoftmaxAttention, cache: KVCache, max_len: int) -> StaticKVCache:
    """Copy ``cache`` (from ``layer``'s prefill, unpadded) into a preallocated cache for ``max_len``
    positions in all (ignored with a window, whose cache holds ``sink + window`` slots).

    Raises if the rows of ``cache`` hold padding or differ in length (the static cache keeps one position
    for the whole batch), or if the cache already holds more than ``max_len`` positions.
    """
    if not bool(cache.valid.all()) or bool((cache.lengths != cache.lengths[0]).any()):
        raise ValueError(
            "static_kv_cache: the cache holds padding or rows of different lengths; a preallocated cache "
            "keeps one position for the whole batch (prefill unpadded prompts of one length)"
        )
    length = int(cache.lengths[0])
    # full attention: round the buffer up to 16 slots (aligned rows for the fused SDPA kernels; the extra
    # slots stay empty and masked); a window's cache has exactly `sink + window` slots (_cache_slot)
    slots = layer.sink + layer.window if layer.window is not None else -(-max_len // 16) * 16
    if length > max_len:
        raise ValueError(
            f"static_kv_cache: the cache holds {length} positions, more than max_len = {max_len}"
        )
    batch, groups, _, head_dim = cache.k.shape
    k = cache.k.new_zeros(batch, groups, slots, head_dim)
    v = torch.zeros_like(k)
    slot_pos = torch.full((slots,), -1, dtype=torch.long, device=k.device)
    if cache.k.shape[2]:
        positions = cache.positions[0]
        index = _cache_slot(layer, positions, slots)
        k.index_copy_(2, index, cache.k.to(k.dtype))
        v.index_copy_(2, index, cache.v.to(v.dtype))
        slot_pos.index_copy_(0, index, positions)
    position = torch.tensor(length, dtype=torch.long, device=k.device)
    return StaticKVCache(k, v, slot_pos, position, tuple(c.clone() for c in cache.convs))


def _cache_slot(layer: SoftmaxAttention, positions: Tensor, slots: int) -> Tensor:
    """The static cache's slot of each position: a sink token's own, else a place in the ring."""
    if layer.window is None:
        return positions % slots
    sink = layer.sink
    return torch.where(positions < sink, positions, sink + (positions - sink) % layer.window)


def attention_decode_step_(layer: SoftmaxAttention, x_t: Tensor, cache: StaticKVCache) -> Tensor:
    """One token through ``layer`` with a :class:`StaticKVCache`, updated in place: ``x_t [B, 1, C]`` ->
    ``y [B, 1, C]``. Same math as ``layer.step``; the caller keeps the position within the cache's size
    (it is not checked: reading it on the host would synchronise)."""
    batch = x_t.shape[0]
    groups, head_dim = layer.num_kv_heads, layer.head_dim
    projected, convs = layer._project(x_t, cache.convs, None)
    for buffer, new in zip(cache.convs, convs, strict=True):
        buffer.copy_(new)
    q = split_heads(projected[0], layer.num_heads)  # [B, H, 1, D]
    k = split_heads(projected[1], groups)  # [B, G, 1, D]
    v = split_heads(projected[2], groups)
    pos = cache.position.view(1)
    cos, sin = rotary_cos_sin(pos, head_dim, theta=layer.rope_theta)  # [1, D/2]
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    slot = _cache_slot(layer, pos, cache.k.shape[2])
    cache.k.index_copy_(2, slot, k.to(cache.k.dtype))
    cache.v.index_copy_(2, slot, v.to(cache.v.dtype))
    cache.slot_pos.index_copy_(0, slot, pos)
    seen = cache.slot_pos
    allowed = (seen >= 0) & (seen <= pos)
    if layer.window is not None:
        allowed &= (pos - seen < layer.window) | (seen < layer.sink)
    # grouped queries: the R = H / G query heads of a key/value head attend as R rows of one problem
    rows = q.reshape(batch, groups, layer.num_heads // groups, head_dim)
    mask = allowed.view(1, 1, 1, -1)
    keys, values = cache.k.to(q.dtype), cache.v.to(q.dtype)
    if layer.far_gate:  # the rows as one head each (G = H): the written-out softmax gives its normaliser
        o, lse = softmax_lse(rows, keys, values, mask)  # [B, G, R, D], [B, G, R]
        share = layer.window_share(x_t, lse.reshape(batch, layer.num_heads, 1), pos)
        o = o * share.reshape(batch, groups, -1, 1)
    else:
        o = F.scaled_dot_product_attention(rows, keys, values, attn_mask=mask)
    cache.position.add_(1)
    return layer.o_proj(merge_heads(o.reshape(batch, layer.num_heads, 1, head_dim)))
