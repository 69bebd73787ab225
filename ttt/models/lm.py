"""A causal language model over any mixer of ``ttt.layers.MIXERS``.

Pre-norm blocks (norm -> mixer -> residual -> norm -> SwiGLU -> residual), a final RMSNorm and a head
tied to the embedding: the backbone of the TTT paper's Transformer baseline, with the attention swapped
for whichever mixer each block names. Generation prefills the prompt in one call (the chunked form of
the mixer) and then decodes one token at a time from the returned state, which for TTT and the
linear-attention family has a constant size.

Shapes: B batch, T tokens, C width, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ttt.modules import RMSNorm, SwiGLU

from .config import LMConfig

__all__ = ["Block", "CausalLM", "build_mixer", "sample", "state_nbytes"]


def build_mixer(name: str, config: LMConfig) -> nn.Module:
    """Instantiate mixer ``name`` from the registry with the config's width, heads and extra kwargs
    (:func:`ttt.layers.make_mixer`: an unknown name or argument is a one-line error)."""
    from ttt.layers import make_mixer

    return make_mixer(name, config.dim, config.n_heads, config.mixer_kwargs.get(name, {}))


class Block(nn.Module):
    """``x + mixer(norm(x))`` then ``x + mlp(norm(x))``; the mixer's state passes through."""

    def __init__(self, dim: int, mixer: nn.Module, mlp_hidden: int | None, eps: float) -> None:
        super().__init__()
        self.mixer_norm, self.mixer = RMSNorm(dim, eps=eps), mixer
        self.mlp_norm, self.mlp = RMSNorm(dim, eps=eps), SwiGLU(dim, mlp_hidden)

    def forward(self, x: Tensor, state: Any = None, mask: Tensor | None = None) -> tuple[Tensor, Any]:
        """``x [B, T, C]`` -> ``(x [B, T, C], state)``."""
        h, state = self.mixer(self.mixer_norm(x), state=state, mask=mask)
        x = x + h
        return x + self.mlp(self.mlp_norm(x)), state

    def step(self, x: Tensor, state: Any) -> tuple[Tensor, Any]:
        """One token: ``x [B, 1, C]`` -> ``(x [B, 1, C], state)``."""
        h, state = self.mixer.step(self.mixer_norm(x), state)
        x = x + h
        return x + self.mlp(self.mlp_norm(x)), state


class CausalLM(nn.Module):
    """Token embedding -> blocks -> RMSNorm -> head. See :class:`LMConfig` for the options.

    ``checkpoint_blocks`` (a training choice, not part of the config; default False): when True, a forward
    that records gradients keeps only each block's input and recomputes the block in the backward
    (``torch.utils.checkpoint``, non-reentrant): activation memory of one block instead of all, for about
    one more forward. The results are the same."""

    def __init__(self, config: LMConfig) -> None:
        super().__init__()
        self.config = config
        self.checkpoint_blocks = False
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.blocks = nn.ModuleList(
            Block(config.dim, build_mixer(name, config), config.mlp_hidden, config.norm_eps)
            for name in config.mixers
        )
        self.norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.head.weight = self.embed.weight
        self._init_weights()

    def _init_weights(self) -> None:
        # mixers initialise themselves (TTT's W0, gates, ...); the embedding and the MLPs use N(0, 0.02),
        # and the MLP output is scaled down by sqrt(2 * n_layers) as in GPT-2 so the residual stays O(1)
        std = self.config.init_std
        nn.init.normal_(self.embed.weight, std=std)
        if not self.config.tie_embeddings:
            nn.init.normal_(self.head.weight, std=std)
        for block in self.blocks:
            for lin in (block.mlp.gate_proj, block.mlp.up_proj):
                nn.init.normal_(lin.weight, std=std)
            nn.init.normal_(block.mlp.down_proj.weight, std=std / math.sqrt(2 * self.config.n_layers))

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed.weight.numel() if non_embedding else n

    def _check_state(self, state: Any, batch: int) -> None:
        """``state`` is a list of one state per block whose tensors hold ``batch`` sequences (every state
        class keeps its batch-first tensors first; a state still without tensors passes)."""
        n = len(self.blocks)
        if not isinstance(state, list | tuple) or len(state) != n:
            got = f"{len(state)} entries" if isinstance(state, list | tuple) else type(state).__name__
            raise ValueError(
                f"state must be the list of {n} per-block states that forward, step or init_state "
                f"returned, got {got}"
            )
        rows = next((r for r in map(_leading_rows, state) if r is not None), None)
        if rows is not None and rows != batch:
            raise ValueError(
                f"the state holds {rows} sequence(s) but idx has {batch} rows: continue a state with the "
                "batch that made it"
            )

    def init_state(self, batch_size: int, device: Any = None, dtype: Any = None) -> list[Any]:
        """Empty per-block states for ``batch_size`` sequences."""
        return [b.mixer.init_state(batch_size, device=device, dtype=dtype) for b in self.blocks]

    def forward(
        self, idx: Tensor, state: list[Any] | None = None, mask: Tensor | None = None
    ) -> tuple[Tensor, list[Any]]:
        """Logits for every position.

        Args:
            idx: ``[B, T]`` token ids.
            state: per-block states from ``init_state`` or a previous call (continue a sequence), or None.
            mask: ``[B, T]`` bool, True = real token (right padding); padded tokens do not change the state.

        Returns:
            ``(logits [B, T, V] float32, state)``.
        """
        if idx.dim() != 2:
            raise ValueError(f"idx must be [B, T] token ids, got shape {list(idx.shape)}")
        if idx.shape[1] > self.config.max_seq_len:
            raise ValueError(
                f"sequence of {idx.shape[1]} tokens is longer than max_seq_len = "
                f"{self.config.max_seq_len} of this model"
            )
        _check_token_ids(idx, self.config.vocab_size)
        if state is not None:
            self._check_state(state, idx.shape[0])
        states = state if state is not None else [None] * len(self.blocks)
        x = self.embed(idx)  # [B, T, C]
        recompute = self.checkpoint_blocks and torch.is_grad_enabled()
        new_states = []
        for block, s in zip(self.blocks, states):
            if recompute:
                x, s = checkpoint(block, x, s, mask, use_reentrant=False)
            else:
                x, s = block(x, state=s, mask=mask)
            new_states.append(s)
        return self.head(self.norm(x)).float(), new_states

    def step(self, idx: Tensor, state: list[Any]) -> tuple[Tensor, list[Any]]:
        """One decoding step: ``idx [B]`` or ``[B, 1]`` -> ``(logits [B, V] float32, state)``.

        ``state``: the per-block states a ``forward`` or ``step`` of the same ``B`` sequences returned
        (or ``init_state(B)``). The ids and the state are checked (one host sync, as ``forward``'s)."""
        if not isinstance(idx, Tensor):
            raise TypeError(f"idx must be a tensor of token ids [B] or [B, 1], got {type(idx).__name__}")
        if idx.dim() not in (1, 2) or (idx.dim() == 2 and idx.shape[1] != 1) or idx.numel() == 0:
            raise ValueError(f"idx must be [B] or [B, 1] token ids, got shape {list(idx.shape)}")
        _check_token_ids(idx, self.config.vocab_size)
        self._check_state(state, idx.shape[0])
        return self._step(idx, state)

    def _step(self, idx: Tensor, state: list[Any]) -> tuple[Tensor, list[Any]]:
        """:meth:`step` without its checks (the decode loop of :meth:`generate_stream`, whose tokens
        and state are its own)."""
        x = self.embed(idx.view(-1, 1))  # [B, 1, C]
        new_states = []
        for block, s in zip(self.blocks, state):
            x, s = block.step(x, s)
            new_states.append(s)
        return self.head(self.norm(x))[:, 0].float(), new_states

    @torch.no_grad()
    def generate_stream(
        self,
        idx: Tensor,
        max_new_tokens: int,
        *,
        lengths: Tensor | Sequence[int] | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
    ) -> Iterator[Tensor]:
        """Yield ``max_new_tokens`` tensors ``[B]``, the k-th new token of every row after its prompt.

        ``idx [B, T]`` holds one prompt per row. Prompts of different lengths are right padded and
        ``lengths [B]`` gives each row's real length (padding is never read). ``temperature == 0`` is greedy
        decoding; ``top_k`` and ``top_p`` restrict sampling as in :func:`sample`. Every prompt plus its new
        tokens must fit ``max_seq_len``.

        How ragged prompts run: the common prefix length ``min(lengths)`` is prefilled in one chunked call;
        from there all rows advance one position per decode step, each fed its own prompt token while it
        has one and its own sampled token after. Every row therefore sees exactly the positions it would
        see alone (TTT's mini-batches stay aligned to each sequence's start, no per-row state offsets are
        needed), so greedy decoding of a ragged batch equals decoding each prompt alone. The prompt
        tokens beyond the shortest prompt cost one decode step each. Sampled tokens are drawn for the
        whole batch at every step, so with ``temperature > 0`` a row's random stream depends on the batch.
        """
        batch, width = idx.shape if idx.dim() == 2 else (0, 0)
        if idx.dim() != 2 or idx.numel() == 0:
            raise ValueError(f"the prompt is empty or not [B, T] token ids: shape {list(idx.shape)}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        lengths = _prompt_lengths(lengths, batch, width)
        # the real prompt tokens (padding is never read); int32 ids as forward takes them, made int64 for
        # the samples written beside them
        _check_token_ids(idx[torch.arange(width) < lengths[:, None].to(idx.device)], self.config.vocab_size)
        idx = idx.long()
        longest = int(lengths.max())
        if longest + max_new_tokens > self.config.max_seq_len:
            raise ValueError(
                f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                f"max_seq_len = {self.config.max_seq_len}"
            )
        if max_new_tokens == 0:
            return
        lengths = lengths.to(idx.device)
        start = int(lengths.min())
        logits, state = self(idx[:, :start])
        logits = logits[:, -1]
        new = idx.new_zeros(batch, max_new_tokens)
        rows = torch.arange(batch, device=idx.device)
        yielded = 0
        # logits predict position t; row b's k-th new token sits at position lengths[b] + k
        for t in range(start, longest + max_new_tokens):
            token = sample(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
            k = t - lengths
            slot = k.clamp(0, max_new_tokens - 1)  # no boolean indexing: it would sync the GPU every step
            sampled = (k >= 0) & (k < max_new_tokens)
            new[rows, slot] = torch.where(sampled, token, new[rows, slot])
            while yielded <= t - longest:  # column k is complete once the longest prompt reached it
                yield new[:, yielded].clone()  # a tensor of its own, not a view of the working buffer
                yielded += 1
            if t + 1 < longest + max_new_tokens:
                if t < longest:
                    token = torch.where(k < 0, idx[:, t], token)
                logits, state = self._step(token, state)

    @torch.no_grad()
    def generate(
        self,
        idx: Tensor,
        max_new_tokens: int,
        *,
        lengths: Tensor | Sequence[int] | None = None,
        pad_id: int = 0,
        **kwargs: Any,
    ) -> Tensor:
        """``idx [B, T]`` -> ``[B, T + max_new_tokens]``: each prompt followed by its new tokens.

        With ``lengths`` (ragged, right-padded prompts) row ``b`` holds its ``lengths[b]`` prompt tokens,
        its ``max_new_tokens`` new tokens, then ``pad_id``. Keyword options as :meth:`generate_stream`.
        """
        new = list(self.generate_stream(idx, max_new_tokens, lengths=lengths, **kwargs))
        new = torch.stack(new, dim=1) if new else idx.new_zeros(idx.shape[0], 0)
        if lengths is None:
            return torch.cat([idx, new], dim=1)
        lengths = _prompt_lengths(lengths, *idx.shape).to(idx.device)
        out = idx.new_full((idx.shape[0], idx.shape[1] + max_new_tokens), pad_id)
        steps = torch.arange(out.shape[1], device=idx.device)
        in_prompt = steps < lengths[:, None]  # [B, T + N]
        out[:, : idx.shape[1]] = torch.where(in_prompt[:, : idx.shape[1]], idx, pad_id)
        in_new = ~in_prompt & (steps < lengths[:, None] + max_new_tokens)
        out[in_new] = new.reshape(-1)
        return out


def _leading_rows(state: Any) -> int | None:
    """The leading size of the first tensor in a block's state (its batch), walking dataclass fields,
    tuples and lists in order; None for a state without tensors (a fresh TTT layer's)."""
    if isinstance(state, Tensor):
        return state.shape[0] if state.dim() else None
    if dataclasses.is_dataclass(state) and not isinstance(state, type):
        parts: Any = (getattr(state, f.name) for f in dataclasses.fields(state))
    elif isinstance(state, list | tuple):
        parts = state
    else:
        return None
    for part in parts:
        rows = _leading_rows(part)
        if rows is not None:
            return rows
    return None


def _prompt_lengths(lengths: Tensor | Sequence[int] | None, batch: int, width: int) -> Tensor:
    """``[B]`` int64 real prompt lengths on the CPU, checked: ``1 <= lengths[b] <= T``."""
    if lengths is None:
        return torch.full((batch,), width, dtype=torch.long)
    lengths = torch.as_tensor(lengths).cpu()
    if lengths.shape != (batch,) or lengths.dtype.is_floating_point or lengths.dtype == torch.bool:
        raise ValueError(
            f"lengths must be [B] = [{batch}] integers (real prompt lengths), got shape "
            f"{list(lengths.shape)} of {lengths.dtype}"
        )
    if bool((lengths < 1).any()) or bool((lengths > width).any()):
        raise ValueError(
            f"lengths must lie in 1..{width} (the prompt width; no prompt is empty), got {lengths.tolist()}"
        )
    return lengths.long()


def sample(
    logits: Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Sample one token per row from ``logits [B, V]``; ``temperature == 0`` takes the argmax.

    ``top_k`` keeps the k most likely tokens (``None``: all of them). ``top_p`` (nucleus sampling,
    Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration") then keeps the smallest set of
    most likely tokens whose probability (after temperature and top-k) sums to at least p, 0 < p <= 1;
    ``None`` or 1 keep every token, so ``top_p=1`` draws exactly what plain sampling draws."""
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got {temperature}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive int or None (all tokens), got {top_k!r}")
    if top_p is not None and (
        isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1
    ):
        raise ValueError(f"top_p must be a number with 0 < top_p <= 1, or None (all tokens), got {top_p!r}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    # shifted by the row's max first: the best token stays at 0, so a tiny temperature turns the rest into
    # -inf (greedy) instead of inf - inf = NaN
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        logits = logits.masked_fill(_outside_nucleus(logits, top_p), float("-inf"))
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def _outside_nucleus(logits: Tensor, top_p: float) -> Tensor:
    """``[B, V]`` bool: True for a token whose more likely tokens already hold probability >= ``top_p``
    (the most likely token is always kept; ties are ordered by a stable sort)."""
    ordered, order = torch.sort(logits, dim=-1, descending=True, stable=True)
    probs = F.softmax(ordered.float(), dim=-1)
    before = F.pad(torch.cumsum(probs, dim=-1)[:, :-1], (1, 0))  # mass of the tokens ranked above each
    outside = before >= top_p
    return outside.scatter(-1, order, outside)


def state_nbytes(state: Any) -> int:
    """Bytes held by the tensors of a (nested) state: a KV cache, TTT fast weights, lists of them."""
    if callable(getattr(state, "nbytes", None)):
        return int(state.nbytes())
    if isinstance(state, Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, (list, tuple)):
        return sum(state_nbytes(s) for s in state)
    if isinstance(state, dict):
        return sum(state_nbytes(s) for s in state.values())
    if hasattr(state, "__dataclass_fields__"):
        return sum(state_nbytes(getattr(state, f)) for f in state.__dataclass_fields__)
    if hasattr(state, "_fields"):
        return sum(state_nbytes(s) for s in state)
    return 0


def _check_token_ids(idx: Tensor, vocab_size: int) -> None:
    """``idx`` holds integer ids in ``[0, vocab_size)`` (one host sync; skipped while compiling)."""
    if idx.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"token ids must be an integer tensor (int64 or int32), got {idx.dtype}")
    if idx.numel() == 0 or torch.compiler.is_compiling():
        return
    if bool(((idx < 0) | (idx >= vocab_size)).any()):
        raise ValueError(
            f"token ids must lie in [0, {vocab_size}) (the model's vocabulary), got ids from "
            f"{int(idx.min())} to {int(idx.max())}"
        )
