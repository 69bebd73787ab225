"""Token streams and batches for language-model training and evaluation.

Training batches are random windows of the concatenated training documents, drawn with an explicit
``torch.Generator``: every process of a distributed run draws the same *global* batch and keeps its own
rows, so one process and N processes see the same data, and saving the generator state makes
``--resume`` continue exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from .corpora import Corpus
from .tokenizer import Tokenizer, train_tokenizer

__all__ = ["TokenData", "prepare", "sample_batch", "validation_batches"]


@dataclass
class TokenData:
    """A tokenized corpus.

    Attributes:
        train: ``[N_train]`` int64 token ids of the training split.
        validation: ``[N_val]`` int64 token ids of the validation split.
        tokenizer: the tokenizer that made them.
        validation_bytes: UTF-8 bytes of the validation text; bits per byte =
            nats per token * (N_val / validation_bytes) / ln 2.
    """

    train: Tensor
    validation: Tensor
    tokenizer: Tokenizer
    validation_bytes: int

    @property
    def tokens_per_byte(self) -> float:
        return self.validation.numel() / max(1, self.validation_bytes)

    def bits_per_byte(self, nats_per_token: float) -> float:
        """Convert a mean validation loss in nats per token to bits per UTF-8 byte."""
        return nats_per_token * self.tokens_per_byte / math.log(2)


def prepare(corpus: Corpus, tokenizer: Tokenizer | str = "bytes", vocab_size: int = 1024) -> TokenData:
    """Tokenize a corpus. ``tokenizer`` is a tokenizer or ``"bytes"`` / ``"bpe"`` (trained on train)."""
    train_text, val_text = corpus.train_text(), corpus.validation_text()
    if isinstance(tokenizer, str):
        tokenizer = train_tokenizer(tokenizer, train_text, vocab_size)
    as_tensor = lambda text: torch.tensor(tokenizer.encode(text), dtype=torch.long)  # noqa: E731
    return TokenData(as_tensor(train_text), as_tensor(val_text), tokenizer, len(val_text.encode("utf-8")))


def sample_batch(
    tokens: Tensor, batch_size: int, context: int, generator: torch.Generator, shard: tuple[int, int] = (0, 1)
) -> tuple[Tensor, Tensor]:
    """Random windows: inputs ``x`` and next-token targets ``y``, both ``[B_local, T]``.

    The global batch of ``batch_size`` rows is drawn from ``generator``; ``shard = (rank, world)``
    keeps rows ``rank::world`` so the union over ranks is the single-process batch. Starts are uniform
    over ``[0, numel - context - 2]``: the very last window (start ``numel - context - 1``) is never drawn.
    That is one window of the whole split, and it stays so, since drawing it would change every batch of
    every run and the published results would no longer replay from their commands.
    """
    if tokens.numel() <= context + 1:
        raise ValueError(
            f"corpus split has {tokens.numel()} tokens, need more than context + 1 = {context + 1}"
        )
    starts = torch.randint(0, tokens.numel() - context - 1, (batch_size,), generator=generator)
    rank, world = shard
    starts = starts[rank::world]
    idx = starts[:, None] + torch.arange(context + 1)[None, :]
    window = tokens[idx]
    return window[:, :-1], window[:, 1:]


def validation_batches(
    tokens: Tensor, batch_size: int, context: int, max_batches: int | None = None
) -> Iterator[tuple[Tensor, Tensor]]:
    """Consecutive non-overlapping windows of the validation split (deterministic): ``[B, T]`` pairs;
    at most ``max_batches`` batches (None: every window)."""
    n_windows = (tokens.numel() - 1) // context
    if n_windows == 0:
        raise ValueError(f"validation split has {tokens.numel()} tokens, need more than {context}")
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be >= 1, or None for every window, got {max_batches}")
    if max_batches is not None:
        n_windows = min(n_windows, max_batches * batch_size)
    for i in range(0, n_windows, batch_size):
        starts = torch.arange(i, min(i + batch_size, n_windows)) * context
        window = tokens[starts[:, None] + torch.arange(context + 1)[None, :]]
        yield window[:, :-1], window[:, 1:]
