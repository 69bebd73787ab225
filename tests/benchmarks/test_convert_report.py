"""benchmarks/convert_report.py on two tiny conversions (an in-layer window with attention sinks, and
sliding-window blocks): the stage table, held-out perplexity at several window lengths, decoding and a
greedy sample, all from the runs' own teacher."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from ttt.testing import load_script

pytest.importorskip("transformers")
pytest.importorskip("gguf")

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "convert_report.py"


def test_report_of_windowed_conversions(tmp_path, monkeypatch, tiny_conversion):
    tiny_conversion("a", mixer="ttt_linear", in_layer_window=4, sink=2)
    tiny_conversion("b", mixer="swa", window=4, sink=2)
    argv = [str(tmp_path / "a"), str(tmp_path / "b"), "--ppl-context", "8,16", "--ppl-tokens", "64",
            "--decode", "12", "--new-tokens", "2", "--prompt", "the cat", "--prompt-tokens", "3",
            "--out", str(tmp_path / "report")]  # fmt: skip
    monkeypatch.setattr(sys, "argv", ["convert_report.py", *argv])
    load_script(SCRIPT).main()
    report = json.loads((tmp_path / "report.json").read_text())
    models = [r["model"] for r in report["runs"]]
    assert models == [
        "ttt_linear beside a 4-token window + 2 sink tokens in blocks all",
        "swa (window 4 + 2 sink tokens) in blocks all",
    ]
    # every model (the teacher and both runs) at both window lengths, on the same 64 tokens
    assert [(c["context"], c["windows"]) for c in report["contexts"]] == [(8, 8)] * 3 + [(16, 4)] * 3
    assert all(math.isfinite(c["perplexity"]) and math.isfinite(c["second_half"]) for c in report["contexts"])
    assert len(report["decode"]) == 3 and len(report["samples"]) == 3
    table = (tmp_path / "report.table.md").read_text()
    assert "second half of each window" in table and "| 16 | 4 |" in table
    # each entry names its run, so two runs of one mixer and blocks (two seeds) stay apart
    runs = [None, str(tmp_path / "a"), str(tmp_path / "b")]
    assert [c["run"] for c in report["contexts"]] == runs * 2 and [d["run"] for d in report["decode"]] == runs
    assert "(`a`) | 16 | 4 |" in table and "(`b`) | 16 | 4 |" in table


def test_a_residual_run_is_labelled_and_a_missing_teacher_is_one_line(
    tmp_path, monkeypatch, capsys, tiny_conversion
):
    import shutil

    tiny_conversion("a", distill_steps=0, mixer="ttt_linear", in_layer_window=4, transfer_target="residual")
    script = load_script(SCRIPT)
    # it and an output-transfer run of the same shape were one label
    assert script.run_rows([tmp_path / "a"])[0]["model"] == (
        "ttt_linear beside a 4-token window (residual transfer) in blocks all"
    )
    # a run with --distill-skip-spikes carries its skipped steps (none in one step) into its row
    tiny_conversion("s", mixer="ttt_linear", distill_skip_spikes=5.0)
    rows = script.run_rows([tmp_path / "a", tmp_path / "s"])
    assert "skipped_steps" not in rows[0] and rows[1]["skipped_steps"] == {"distill": []}
    shutil.rmtree(tmp_path / "llama")  # the teacher moved away: was a LlamaLoadError traceback
    capsys.readouterr()  # the conversion's own output
    monkeypatch.setattr(sys, "argv", ["convert_report.py", str(tmp_path / "a"), "--prompt", "the",
                                      "--out", str(tmp_path / "report")])  # fmt: skip
    with pytest.raises(SystemExit) as e:
        script.main()
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "its teacher" in err
    assert not (tmp_path / "report.json").exists()
