"""Reading a user's text files: line ends as Python's text mode reads them; binary and missing files refused."""

from __future__ import annotations

import pytest

from ttt.data import read_text, read_text_files


def test_read_text_reads_line_ends_as_text_mode_does_and_refuses_binary(tmp_path):
    f = tmp_path / "crlf.txt"
    f.write_bytes("caf\u00e9\r\nb\rc\n".encode())
    assert read_text(f) == f.read_text(encoding="utf-8") == "caf\u00e9\nb\nc\n"
    (tmp_path / "nul.txt").write_bytes(b"text\0more")
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9".encode("latin-1"))
    for name, message in [
        ("nul.txt", "NUL bytes"),
        ("latin1.txt", r"not UTF-8 text \(.* at byte 3\)"),
        ("nope", "no such file"),
    ]:
        with pytest.raises((ValueError, OSError), match=message):
            read_text(tmp_path / name)
    with pytest.raises(IsADirectoryError, match="is a directory"):
        read_text(tmp_path)


def test_read_text_files_of_a_directory_skips_binary_and_hidden_files(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / ".git").mkdir()
    (tmp_path / "b" / "two.txt").write_text("2")
    (tmp_path / "one.md").write_text("1")
    (tmp_path / ".git" / "HEAD").write_text("ref")
    (tmp_path / "blob.bin").write_bytes(b"\0\1")
    texts, skipped = read_text_files(tmp_path)
    assert [(p.name, t) for p, t in texts] == [("two.txt", "2"), ("one.md", "1")]
    assert skipped == [tmp_path / "blob.bin"]
    assert read_text_files(tmp_path / "one.md") == ([(tmp_path / "one.md", "1")], [])


def test_a_ttt_run_or_checkpoint_directory_is_not_text_to_read(tmp_path):
    """`ttt eval --file runs/x` scored the run's JSON files as text."""
    run = tmp_path / "run"
    (run / "step-000002").mkdir(parents=True)
    (run / "step-000002" / "checkpoint.json").write_text('{"format": "ttt-checkpoint-2"}\n')
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    for path in (run, run / "step-000002"):
        with pytest.raises(
            ValueError, match=f"^{path} is a ttt run or checkpoint directory, not text to evaluate; "
        ):
            read_text_files(path)


@pytest.mark.parametrize("nested", ["run", "texts/run"])
def test_a_ttt_run_inside_a_directory_of_texts_is_refused_too(tmp_path, nested):
    """`ttt eval --file DIR` with a run directory somewhere below DIR scored the run's checkpoint.json,
    metrics.jsonl and earlier eval results as text; a training corpus directory read them too (stranger
    review). Only a run given directly was refused."""
    from ttt.data import load_corpus

    top = tmp_path / "top"
    for i in range(3):
        (top / "texts").mkdir(parents=True, exist_ok=True)
        (top / "texts" / f"doc{i}.txt").write_text(f"document {i}\n" * 20)
    run = top / nested
    (run / "step-000002").mkdir(parents=True)
    (run / "step-000002" / "checkpoint.json").write_text('{"format": "ttt-checkpoint-2"}\n')
    (run / "latest").write_text("step-000002\n")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    with pytest.raises(ValueError, match=f"^{top} holds a ttt run or checkpoint directory, {run}: "):
        read_text_files(top)
    with pytest.raises(ValueError, match=f"^corpus {top} holds a ttt run or checkpoint directory, {run}: "):
        load_corpus(str(top))
    texts, skipped = read_text_files(top / "texts" if nested == "run" else top / "texts" / "doc0.txt")
    assert skipped == [] and texts
