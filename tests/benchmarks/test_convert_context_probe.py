"""benchmarks/convert_context_probe.py on two tiny conversions (TTT-Linear, and sliding-window attention,
which has no inner learning rate): position buckets, the inner-lr ablation, and its bad input."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from ttt.testing import load_script

pytest.importorskip("transformers")
pytest.importorskip("gguf")

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "convert_context_probe.py"


def test_buckets_cover_every_position_once():
    script = load_script(SCRIPT)
    assert script.buckets(2048) == [(0, 16), (16, 64), (64, 256), (256, 1024), (1024, 2048)]
    assert script.buckets(100) == [(0, 16), (16, 64), (64, 100)]
    assert script.buckets(8) == [(0, 8)]


def test_probe_of_a_ttt_and_an_attention_conversion(tmp_path, monkeypatch, tiny_conversion):
    tiny_conversion("a", mixer="ttt_linear")
    tiny_conversion("b", mixer="swa", window=4)
    argv = [str(tmp_path / "a"), str(tmp_path / "b"), "--context", "32", "--tokens", "64",
            "--inner-lr-scale", "0,2", "--out", str(tmp_path / "probe")]  # fmt: skip
    monkeypatch.setattr(sys, "argv", ["convert_context_probe.py", *argv])
    script = load_script(SCRIPT)
    script.main()
    report = json.loads((tmp_path / "probe.json").read_text())
    rows = [(r["model"], r["inner_lr_scale"]) for r in report["rows"]]
    # the swa run has no inner lr: no scaled rows for it
    assert rows == [("teacher", None), ("a", 1.0), ("a", 0.0), ("a", 2.0), ("b", 1.0)]
    assert all(list(r["buckets"]) == ["0-15", "16-31"] for r in report["rows"])
    assert all(math.isfinite(r["perplexity"]) for r in report["rows"])
    by = {(r["model"], r["inner_lr_scale"]): r for r in report["rows"]}
    assert by[("a", 0.0)]["perplexity"] != by[("a", 1.0)]["perplexity"]  # the inner update matters
    assert set(by[("a", 1.0)]["gates"]) == {"0", "1"} and by[("b", 1.0)]["gates"] == {}
    assert all(0 < g < 1 for g in by[("a", 1.0)]["gates"].values())
    table = (tmp_path / "probe.table.md").read_text()
    assert "| a | 0 |" in table and "positions 16-31" in table and "inner-lr gate" in table


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--inner-lr-scale", "0,x"], "--inner-lr-scale: expected non-negative numbers such as 0,0.5,2"),
        (["--inner-lr-scale", "-1"], "--inner-lr-scale: expected non-negative numbers such as 0,0.5,2"),
        (["--inner-lr-scale", "nan"], "--inner-lr-scale: expected non-negative numbers such as 0,0.5,2"),
        (["--context", "128", "--tokens", "64"], "longer than --tokens"),
    ],
)
def test_bad_arguments_are_one_line_before_any_work(tmp_path, monkeypatch, capsys, extra, message):
    (tmp_path / "run" / "hf").mkdir(parents=True)
    (tmp_path / "run" / "convert.json").write_text("{}")
    monkeypatch.setattr(sys, "argv", ["convert_context_probe.py", str(tmp_path / "run"), *extra,
                                      "--out", str(tmp_path / "probe")])  # fmt: skip
    with pytest.raises(SystemExit) as e:
        load_script(SCRIPT).main()
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and err.strip().count("\n") <= 1


def test_a_directory_that_is_not_a_finished_run_is_refused(tmp_path, monkeypatch, capsys):
    (tmp_path / "run").mkdir()
    monkeypatch.setattr(sys, "argv", ["convert_context_probe.py", str(tmp_path / "run"), "--out",
                                      str(tmp_path / "probe")])  # fmt: skip
    with pytest.raises(SystemExit) as e:
        load_script(SCRIPT).main()
    assert e.value.code == 2 and "expected finished ttt convert run directories" in capsys.readouterr().err
