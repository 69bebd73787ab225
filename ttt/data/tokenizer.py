"""Tokenizers: raw UTF-8 bytes (the default; report bits per byte) or a byte-level BPE trained locally.

Both map ``str -> list[int]`` and back, and serialise to a small JSON dict so a checkpoint carries its
tokenizer. The BPE uses the HuggingFace ``tokenizers`` package (``pip install 'ttt[data]'``); nothing is
downloaded, it is trained on the training split of the corpus.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

__all__ = [
    "BPETokenizer",
    "ByteTokenizer",
    "StreamDecoder",
    "Tokenizer",
    "tokenizer_from_dict",
    "train_tokenizer",
]


class Tokenizer(Protocol):
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...
    def to_dict(self) -> dict[str, Any]: ...


class ByteTokenizer:
    """One token per UTF-8 byte (vocab 256). Loss in nats per token / ln 2 is bits per byte."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "bytes"}


class StreamDecoder:
    """Incremental decoding for streaming output: returns text only once its bytes are complete."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer, self.pending = tokenizer, []

    def push(self, token: int) -> str:
        self.pending.append(int(token))
        text = self.tokenizer.decode(self.pending)
        # a multi-byte character cut in half decodes to U+FFFD at the end: wait for its next bytes
        if text.endswith("\ufffd") and len(self.pending) < 4:
            return ""
        self.pending = []
        return text

    def flush(self) -> str:
        """What is still held back (a character cut at the end of the output), decoded as ``decode``
        would: the streamed pieces and this add up to the whole text decoded at once."""
        text, self.pending = self.tokenizer.decode(self.pending), []
        return text


class BPETokenizer:
    """Byte-level BPE (HuggingFace ``tokenizers``), trained locally with ``BPETokenizer.train``."""

    def __init__(self, tok: Any):
        self._tok = tok
        self.vocab_size = tok.get_vocab_size()

    @classmethod
    def train(cls, text: str, vocab_size: int = 1024) -> BPETokenizer:
        """Train on ``text`` (the training split only, so validation stays unseen)."""
        from ttt._extras import require

        require("tokenizers", "the BPE tokenizer")
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        if vocab_size < 257:
            raise ValueError(f"BPE vocab_size must be > 256 (the byte alphabet), got {vocab_size}")
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        )
        lines = text.splitlines(keepends=True)
        tok.train_from_iterator(("".join(lines[i : i + 256]) for i in range(0, len(lines), 256)), trainer)
        return cls(tok)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode([int(i) for i in ids])

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "bpe", "json": self._tok.to_str()}


def tokenizer_from_dict(d: dict[str, Any]) -> Tokenizer:
    """Inverse of ``to_dict``."""
    if d.get("kind") == "bytes":
        return ByteTokenizer()
    if d.get("kind") == "bpe":
        from ttt._extras import require

        tokenizers = require("tokenizers", "a checkpoint with a BPE tokenizer")
        return BPETokenizer(tokenizers.Tokenizer.from_str(d["json"]))
    raise ValueError(f"unknown tokenizer description: {json.dumps(d)[:100]}")


def train_tokenizer(kind: str, text: str, vocab_size: int = 1024) -> Tokenizer:
    """``kind`` is ``"bytes"`` (``text`` unused) or ``"bpe"`` (trained on ``text``)."""
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "bpe":
        return BPETokenizer.train(text, vocab_size)
    raise ValueError(f"unknown tokenizer {kind!r}: expected 'bytes' or 'bpe'")
