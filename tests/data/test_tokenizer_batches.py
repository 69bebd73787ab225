"""Tokenizers (bytes, BPE), streaming decode, batches, bits per byte, the digits data."""

from __future__ import annotations

import math

import pytest
import torch

from ttt.data import (
    BPETokenizer,
    ByteTokenizer,
    Corpus,
    StreamDecoder,
    load_digits,
    prepare,
    sample_batch,
    tokenizer_from_dict,
    validation_batches,
)

TEXT = "ROMEO:\nBut soft, what light through yonder window breaks? — é\n\n" * 40


def test_byte_tokenizer_roundtrip():
    tok = ByteTokenizer()
    assert tok.decode(tok.encode(TEXT)) == TEXT and max(tok.encode(TEXT)) < 256


def test_bpe_trains_locally_and_roundtrips():
    tok = BPETokenizer.train(TEXT, vocab_size=300)
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT and len(ids) < len(TEXT.encode())
    again = tokenizer_from_dict(tok.to_dict())
    assert again.encode(TEXT) == ids and again.vocab_size == tok.vocab_size
    with pytest.raises(ValueError, match="> 256"):
        BPETokenizer.train(TEXT, vocab_size=100)


def test_stream_decoder_waits_for_whole_characters():
    tok = ByteTokenizer()
    dec = StreamDecoder(tok)
    pieces = [dec.push(b) for b in "a—é".encode()]
    assert "".join(pieces) == "a—é" and pieces[1] == "" and pieces[2] == ""


def test_stream_decoder_flush_gives_what_decoding_at_once_gives():
    tok = ByteTokenizer()
    for ids in (list("a—".encode())[:-1], list(b"ab"), [0xC3], []):
        dec = StreamDecoder(tok)
        streamed = "".join(dec.push(b) for b in ids) + dec.flush()
        assert streamed == tok.decode(ids) and dec.flush() == ""


def test_prepare_and_bits_per_byte():
    data = prepare(Corpus("t", (TEXT,), (TEXT[:500],)))
    assert data.train.dtype == torch.long and data.tokens_per_byte == 1.0
    assert data.bits_per_byte(math.log(2)) == pytest.approx(1.0)
    bpe = prepare(Corpus("t", (TEXT,), (TEXT[:500],)), "bpe", vocab_size=300)
    assert bpe.tokens_per_byte < 1.0


def test_sample_batch_shards_make_the_global_batch():
    tokens = torch.arange(1000)
    full_x, full_y = sample_batch(tokens, 8, 16, torch.Generator().manual_seed(3))
    assert full_x.shape == (8, 16) and torch.equal(full_y[:, :-1], full_x[:, 1:])
    shards = [sample_batch(tokens, 8, 16, torch.Generator().manual_seed(3), shard=(r, 2))[0] for r in (0, 1)]
    assert torch.equal(torch.stack(shards, 1).reshape(8, 16), full_x)
    with pytest.raises(ValueError, match="context"):
        sample_batch(tokens[:10], 2, 16, torch.Generator())


def test_validation_batches_are_deterministic_and_cover_in_order():
    tokens = torch.arange(100)
    batches = list(validation_batches(tokens, 2, 10, None))
    xs = torch.cat([x for x, _ in batches])
    assert xs.shape == (9, 10) and torch.equal(xs.flatten(), torch.arange(90))
    assert len(list(validation_batches(tokens, 2, 10, max_batches=2))) == 2


def test_digits_split():
    x_tr, y_tr, x_te, y_te = load_digits()
    assert x_tr.shape[1] == 64 and x_tr.shape[0] + x_te.shape[0] == 1797
    assert int(x_tr.max()) <= 16 and set(y_te.tolist()) == set(range(10))
