"""Whole-model decoding with preallocated states updated in place, and a CUDA-graph captured step.

``CausalLM.step`` returns new state objects every token (a ``torch.cat`` per token for attention's KV
cache). :class:`StaticDecoder` instead copies the prefill's states once into preallocated buffers and
updates them in place, so one decode step allocates nothing the caller sees, reads no value on the host
and can be captured in a CUDA graph (``cuda_graph=True``): a step is then one graph replay.

Per mixer:

* attention / swa: :class:`ttt.layers.attention.StaticKVCache` (a ``[B, G, S, D]`` buffer written at the
  token's slot; the window's cache is a ring of ``window`` slots); the step attends over the whole buffer
  with a mask, so its cost grows with the buffer, as a KV cache's does.
* TTT-Linear / TTT-MLP: fp32 anchor and gradient-sum buffers and an int32 offset per (row, head),
  stepped by the fused in-place Triton decode kernels (CUDA, or CPU under ``TRITON_INTERPRET=1``);
  elsewhere by the layer's own single-token form, whose result is copied into the buffers.
* the windowed mixer (sliding window + a recurrent mixer in one layer): its window's and its inner
  mixer's slots, as above, their outputs summed with the layer's gain.
* any other mixer (the family layers, KV binding): its ``step`` on the buffers, the new state copied into
  them (``copy_``); its tensors must keep their shapes. The registered mixers' steps read no tensor value
  on the host (tested for each by running a whole-model step on the ``meta`` device), except the gate
  range checks of the family ops; those skip themselves while a graph is being captured
  (``ttt.ops._checks.capturing``) and run in the eager warm-up steps before the capture. So they count as
  ``graphable``; no GPU has captured one yet. A mixer not in ``ttt.layers.MIXERS`` does not count, and a
  replayed graph checks nothing.

Every row of the batch sits at the same position (prefill unpadded prompts of one length).
Shapes: B batch, T prompt tokens, V vocabulary.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ttt.layers.attention import Attention, KVCache, attention_decode_step_, static_kv_cache
from ttt.layers.protocol import merge_heads, split_heads
from ttt.layers.ttt import TTTMLP, TTTLayerState, TTTLinear
from ttt.layers.windowed import WindowedMixer, WindowedState
from ttt.modules.rotary import apply_rotary, rotary_cos_sin
from ttt.ops._state import last_token_weights
from ttt.ops.types import TTTState

from .lm import CausalLM

__all__ = ["StaticDecoder"]


class _AttentionSlot:
    """A block's attention state as a :class:`StaticKVCache`."""

    graphable = True

    def __init__(self, layer: Attention, state: KVCache, max_len: int) -> None:
        self.layer, self.cache = layer, static_kv_cache(layer, state, max_len)

    def step(self, x: Tensor) -> Tensor:
        return attention_decode_step_(self.layer, x, self.cache)

    def buffers(self) -> list[Tensor]:
        return [self.cache.k, self.cache.v, self.cache.slot_pos, self.cache.position, *self.cache.convs]


def _triton_decode(layer: nn.Module, device: torch.device):
    """The layer's fused in-place decode kernel where it runs (CUDA, or the interpreter), else None."""
    import os

    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return None
    try:
        if isinstance(layer, TTTLinear):
            from ttt.ops.ttt_linear.triton.decode import ttt_linear_decode_ as decode_
        else:
            from ttt.ops.ttt_mlp.triton.decode import ttt_mlp_decode_ as decode_
    except ImportError:
        return None
    return decode_


class _TTTSlot:
    """A block's TTT state as fp32 anchor / gradient-sum buffers, an int32 offset [B, H] and a position."""

    graphable = True

    def __init__(self, layer: TTTLinear | TTTMLP, state: TTTLayerState | None, batch: int, device) -> None:
        self.layer = layer
        b = layer.mini_batch_size
        if state is None or state.ttt is None:
            weights = tuple(w.detach().expand(batch, *w.shape) for w in layer.fast_weights())
            anchor, grad_sum, offset = weights, tuple(torch.zeros_like(w) for w in weights), 0
            position = 0 if state is None else state.position
            conv_q = None if state is None else state.conv_q
            conv_k = None if state is None else state.conv_k
            if layer.share_qk and conv_q is None:
                init = layer.init_state(batch, device=device, dtype=layer.q_proj.weight.dtype)
                conv_q, conv_k = init.conv_q, init.conv_k
        else:
            st = state.ttt
            anchor, grad_sum, offset = st.anchor, st.grad_sum, st.offset
            position, conv_q, conv_k = state.position, state.conv_q, state.conv_k
        f32 = lambda t: t.detach().to(torch.float32).contiguous().clone()  # noqa: E731
        self.anchor = tuple(f32(t) for t in anchor)
        self.grad_sum = tuple(f32(t) for t in grad_sum)
        self.offset = torch.full((batch, layer.num_heads), offset % b, dtype=torch.int32, device=device)
        self.position = torch.tensor(position, dtype=torch.long, device=device)
        self.conv_q = None if conv_q is None else conv_q.detach().clone()
        self.conv_k = None if conv_k is None else conv_k.detach().clone()
        self.decode_ = _triton_decode(layer, torch.device(device))
        self.graphable = self.decode_ is not None

    def buffers(self) -> list[Tensor]:
        extra = [t for t in (self.conv_q, self.conv_k) if t is not None]
        return [*self.anchor, *self.grad_sum, self.offset, self.position, *extra]

    def step(self, x: Tensor) -> Tensor:
        """``x [B, 1, C]`` -> ``y [B, 1, C]``; the layer's ``step`` with its state in these buffers."""
        layer = self.layer
        q, k, conv_q, conv_k = layer._query_key(x, TTTLayerState(None, self.conv_q, self.conv_k, 0), None)
        if conv_q is not None:
            self.conv_q.copy_(conv_q)
            self.conv_k.copy_(conv_k)
        v = split_heads(layer.v_proj(x), layer.num_heads)  # [B, H, 1, D]
        cos, sin = rotary_cos_sin((self.position % layer.mini_batch_size).view(1), layer.head_dim,
                                  theta=layer.rope_theta)  # fmt: skip
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        lr, token_eta = layer._inner_lr(x, None)  # [B, H, 1], [b]
        o = self._fast_weights_step(q, k, v, lr, token_eta)  # [B, H, 1, D]
        self.position.add_(1)
        # the layer's output path (as _TTTLayer._run)
        y = layer.post_norm(merge_heads(o))
        if layer.g_proj is not None:
            y = F.gelu(layer.g_proj(x), approximate="tanh") * y
        return layer.o_proj(y)

    def _fast_weights_step(self, q: Tensor, k: Tensor, v: Tensor, lr: Tensor, token_eta: Tensor) -> Tensor:
        layer = self.layer
        if self.decode_ is not None:
            f32 = lambda t: t.to(torch.float32).contiguous()  # noqa: E731
            o = self.decode_(
                q.contiguous(), k.contiguous(), v.contiguous(), lr.contiguous(), f32(layer.ln_weight),
                f32(layer.ln_bias), f32(token_eta), self.anchor, self.grad_sum, self.offset,
            )  # fmt: skip
            return o[:, :, None]
        # no Triton here: the layer's single-token form, its new state copied into the buffers
        offset = int(self.offset[0, 0])
        weights = last_token_weights(self.anchor, self.grad_sum, offset, token_eta.float())
        state = TTTState(weights, self.anchor, self.grad_sum, offset, layer.mini_batch_size, layer.op)
        o, new = layer._op(
            q, k, v, lr, initial_state=state, token_eta=token_eta, mini_batch_size=layer.mini_batch_size,
            causal=True, output_final_state=True, impl="auto", decode=True,
        )  # fmt: skip
        for buf, t in zip(self.anchor + self.grad_sum, new.anchor + new.grad_sum):
            buf.copy_(t)
        self.offset.fill_(new.offset)
        return o


def _tensors(state: Any) -> list[Tensor]:
    """The tensors of a (nested) state, in a fixed order; non-tensor leaves are left out."""
    if isinstance(state, Tensor):
        return [state]
    if dataclasses.is_dataclass(state):
        return [t for f in dataclasses.fields(state) for t in _tensors(getattr(state, f.name))]
    if isinstance(state, (tuple, list)):
        return [t for s in state for t in _tensors(s)]
    return []


def _others(state: Any) -> list[Any]:
    """The non-tensor leaves of a state (they must not change between steps)."""
    if isinstance(state, Tensor):
        return []
    if dataclasses.is_dataclass(state):
        return [o for f in dataclasses.fields(state) for o in _others(getattr(state, f.name))]
    if isinstance(state, (tuple, list)):
        return [o for s in state for o in _others(s)]
    return [state]


class _GenericSlot:
    """Any other mixer: ``layer.step`` on preallocated state tensors, the new state copied into them."""

    def __init__(self, layer: nn.Module, state: Any) -> None:
        from ttt.layers import MIXERS

        # a registered mixer's step reads no value on the host (tests/models/test_static_decode.py, meta)
        self.graphable = type(layer) in set(MIXERS.values())
        self.layer = layer
        self.state = _clone(state)
        self.tensors = _tensors(self.state)

    def step(self, x: Tensor) -> Tensor:
        y, new = self.layer.step(x, self.state)
        new_tensors = _tensors(new)
        if [t.shape for t in new_tensors] != [t.shape for t in self.tensors] or _others(new) != _others(
            self.state
        ):
            raise ValueError(
                f"StaticDecoder: {type(self.layer).__name__}.step changed the layout of its state; "
                "it cannot decode into preallocated buffers"
            )
        for buf, t in zip(self.tensors, new_tensors):
            buf.copy_(t)
        return y

    def buffers(self) -> list[Tensor]:
        return self.tensors


class _WindowedSlot:
    """A :class:`~ttt.layers.WindowedMixer`'s state: its window's slot and its inner mixer's slot."""

    def __init__(self, layer: WindowedMixer, state: WindowedState, max_len: int, batch: int, device) -> None:
        self.layer = layer
        self.window = _AttentionSlot(layer.attn, state.window, max_len)
        self.inner = _slot(layer.inner, state.inner, max_len, batch, device)
        self.graphable = self.window.graphable and self.inner.graphable

    def step(self, x: Tensor) -> Tensor:
        return self.layer.combine(self.window.step(x), self.inner.step(x))

    def buffers(self) -> list[Tensor]:
        return [*self.window.buffers(), *self.inner.buffers()]


def _slot(mixer: nn.Module, state: Any, max_len: int, batch: int, device) -> Any:
    """The preallocated decode slot of one block's mixer, holding its prefill ``state``."""
    if isinstance(mixer, Attention):
        return _AttentionSlot(mixer, state, max_len)
    if isinstance(mixer, (TTTLinear, TTTMLP)):
        return _TTTSlot(mixer, state, batch, device)
    if isinstance(mixer, WindowedMixer):
        return _WindowedSlot(mixer, state, max_len, batch, device)
    return _GenericSlot(mixer, state)


def _clone(state: Any) -> Any:
    if isinstance(state, Tensor):
        return state.detach().clone()
    if dataclasses.is_dataclass(state):
        return dataclasses.replace(
            state, **{f.name: _clone(getattr(state, f.name)) for f in dataclasses.fields(state)}
        )
    if isinstance(state, tuple):
        return tuple(_clone(s) for s in state)
    if isinstance(state, list):
        return [_clone(s) for s in state]
    return state


class StaticDecoder:
    """Decode a :class:`CausalLM` with preallocated, in-place states; optionally as a CUDA graph.

    Args:
        model: the model (its parameters are read, not copied).
        max_len: the most positions (prompt + new tokens) a sequence may reach; sizes attention's cache.
        cuda_graph: capture one decode step in a CUDA graph at the first :meth:`step` (CUDA only; a model
            with a mixer that cannot be captured raises, see ``graphable``).
        autocast: run the steps under ``torch.autocast(device, dtype)`` (e.g. ``torch.bfloat16``), or None.

    Examples::

        >>> import torch
        >>> from ttt.models import CausalLM, LMConfig
        >>> from ttt.models.static_decode import StaticDecoder
        >>> model = CausalLM(LMConfig.from_name("micro", mixer="attention")).eval()
        >>> dec = StaticDecoder(model, max_len=16)
        >>> logits = dec.prefill(torch.tensor([[1, 2, 3]]))
        >>> logits = dec.step(logits.argmax(-1))
        >>> logits.shape, dec.length
        (torch.Size([1, 256]), 4)
    """

    def __init__(
        self,
        model: CausalLM,
        max_len: int,
        *,
        cuda_graph: bool = False,
        autocast: torch.dtype | None = None,
    ) -> None:
        if not isinstance(max_len, int) or isinstance(max_len, bool):
            raise TypeError(f"max_len must be an int, got {type(max_len).__name__}")
        if max_len < 1 or max_len > model.config.max_seq_len:
            raise ValueError(
                f"max_len must lie in 1..max_seq_len = {model.config.max_seq_len}, got {max_len}"
            )
        self.model, self.max_len, self.cuda_graph, self.autocast = model, max_len, cuda_graph, autocast
        self.slots: list[Any] = []
        self.length = 0
        self._graph: torch.cuda.CUDAGraph | None = None

    @property
    def graphable(self) -> bool:
        """Whether every block's step can be captured in a CUDA graph (known after :meth:`prefill`)."""
        return bool(self.slots) and all(s.graphable for s in self.slots)

    def _ctx(self, device: torch.device):
        if self.autocast is None:
            return torch.autocast(device.type, enabled=False)
        # no cast cache: a captured graph must cast the weights itself, not reuse casts made outside it
        return torch.autocast(device.type, dtype=self.autocast, cache_enabled=False)

    @torch.no_grad()
    def prefill(self, idx: Tensor) -> Tensor:
        """Run the prompt ``idx [B, T]`` (one chunked forward) and preallocate the states; returns the
        logits of its last position ``[B, V]`` float32."""
        if idx.dim() != 2 or idx.shape[1] < 1:
            raise ValueError(f"idx must be [B, T] token ids with T >= 1, got shape {list(idx.shape)}")
        if idx.shape[1] >= self.max_len:
            raise ValueError(f"the prompt ({idx.shape[1]} tokens) leaves no room in max_len = {self.max_len}")
        with self._ctx(idx.device):
            logits, states = self.model(idx)
        batch, device = idx.shape[0], idx.device
        self.slots = [
            _slot(b.mixer, s, self.max_len, batch, device) for b, s in zip(self.model.blocks, states)
        ]
        if self.cuda_graph and (device.type != "cuda" or not self.graphable):
            names = [type(s.layer).__name__ for s in self.slots if not s.graphable]
            raise ValueError(
                f"cuda_graph=True needs CUDA and mixers whose step can be captured; device {device}, "
                f"not capturable: {sorted(set(names))}"
            )
        self.length = idx.shape[1]
        self.token = torch.zeros(batch, dtype=torch.long, device=device)
        self.logits = torch.zeros(batch, logits.shape[-1], dtype=torch.float32, device=device)
        self._graph = None
        return logits[:, -1]

    def _step(self) -> None:
        model = self.model
        with self._ctx(self.token.device):
            x = model.embed(self.token.view(-1, 1))  # [B, 1, C]
            for block, slot in zip(model.blocks, self.slots):  # as Block.step
                x = x + slot.step(block.mixer_norm(x))
                x = x + block.mlp(block.mlp_norm(x))
            self.logits.copy_(model.head(model.norm(x))[:, 0].float())

    def _capture(self) -> None:
        buffers = [t for s in self.slots for t in s.buffers()]
        saved = [t.clone() for t in buffers]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up (compiles the kernels) outside the graph
            for _ in range(2):
                self._step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._step()
        for t, s in zip(buffers, saved):  # the warm-up steps advanced the states: undo them
            t.copy_(s)
        self._graph = graph

    @torch.no_grad()
    def step(self, token: Tensor) -> Tensor:
        """Feed ``token [B]`` (or ``[B, 1]``); returns the next logits ``[B, V]`` float32.

        The result is the decoder's output buffer, overwritten by the next step: clone it to keep it."""
        if not self.slots:
            raise RuntimeError("StaticDecoder.step before prefill")
        if self.length >= self.max_len:
            raise ValueError(f"the sequence reached max_len = {self.max_len}")
        batch = self.token.shape[0]
        # shape and dtype only (no host read): a [1] token would broadcast into every row of the buffer
        if token.dim() not in (1, 2) or token.shape[0] != batch or token.numel() != batch:
            raise ValueError(
                f"token must be [B] or [B, 1] token ids with B = {batch} (the prefill's batch), "
                f"got shape {list(token.shape)}"
            )
        if token.dtype.is_floating_point or token.dtype.is_complex or token.dtype == torch.bool:
            raise ValueError(f"token must hold integer ids, got {token.dtype}")
        self.token.copy_(token.view(-1))
        if self.cuda_graph:
            if self._graph is None:
                self._capture()
            self._graph.replay()
        else:
            self._step()
        self.length += 1
        return self.logits

    def state_nbytes(self) -> int:
        """Bytes of the preallocated decode states (all blocks)."""
        return sum(t.numel() * t.element_size() for s in self.slots for t in s.buffers())
