import pytest


@pytest.fixture
def corpus_dir(tmp_path):
    """A tiny corpus of 10 made-up documents (train 9 / validation 1)."""
    d = tmp_path / "corpus"
    d.mkdir()
    for i in range(10):
        lines = [
            f"SPEAKER {j % 3}:\nline {i}-{j}, the quick brown fox jumps over the lazy dog.\n"
            for j in range(40)
        ]
        (d / f"doc{i:02d}.txt").write_text("\n".join(lines))
    return str(d)
