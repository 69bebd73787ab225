"""Shared pieces of the recipes: the results' free names."""

import threading
from pathlib import Path

from ttt.recipes.common import reserved_stem


def _names(stem: str) -> list[str]:
    return [f"{stem}.md", f"{stem}.json"]


def test_reserved_stem_skips_taken_names_and_leaves_no_marker(tmp_path: Path):
    (tmp_path / "r.json").write_text("{}")
    with reserved_stem(tmp_path, "r", _names) as stem:
        assert stem == "r-2"
        (tmp_path / f"{stem}.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r-2.json", "r.json"]


def test_reserved_stem_passes_over_a_name_another_run_holds(tmp_path: Path):
    """A run that has chosen a name but not yet written its files holds it: a second run started meanwhile
    takes the next one instead of replacing the first run's results a moment later."""
    with reserved_stem(tmp_path, "r", _names) as first:
        with reserved_stem(tmp_path, "r", _names) as second:
            assert (first, second) == ("r", "r-2")


def test_reserved_stem_concurrent_runs_get_distinct_names(tmp_path: Path):
    got: list[str] = []
    start = threading.Barrier(8)

    def run() -> None:
        start.wait()
        with reserved_stem(tmp_path, "r", _names) as stem:
            (tmp_path / f"{stem}.json").write_text(stem)
            got.append(stem)

    threads = [threading.Thread(target=run) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(got)) == 8
    assert {p.read_text() for p in tmp_path.glob("*.json")} == set(got)
