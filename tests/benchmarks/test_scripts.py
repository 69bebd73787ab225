"""The benchmark scripts parse their command lines as ``ttt`` does (``ttt.recipes.args.Parser``): a wrong
option is one line naming it and exit code 2, never argparse's usage block, and no option is a prefix."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def test_no_script_builds_a_plain_argparse_parser():
    plain = [p.name for p in sorted(BENCHMARKS.glob("*.py")) if "ArgumentParser(" in p.read_text()]
    assert not plain, f"use ttt.recipes.args.Parser in {plain}"


def test_a_wrong_option_is_one_line_and_exit_2():
    out = subprocess.run([sys.executable, str(BENCHMARKS / "family_cpu.py"), "--stpes", "3"],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and "unrecognized arguments: --stpes 3" in out.stderr


def test_an_option_is_its_whole_name(monkeypatch, capsys):
    from ttt.testing import load_script

    # --ppl is a prefix of --ppl-context and --ppl-tokens; plain argparse would have taken it for one
    monkeypatch.setattr(sys, "argv", ["convert_report.py", "run", "--out", "x", "--ppl", "256"])
    with pytest.raises(SystemExit) as e:
        load_script(BENCHMARKS / "convert_report.py").main()
    assert e.value.code == 2 and "unrecognized arguments: --ppl 256" in capsys.readouterr().err


def test_convert_report_refuses_an_out_it_cannot_write_before_any_work(tmp_path, monkeypatch, capsys):
    from ttt.testing import load_script

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "convert.json").write_text("{}")  # never read: the check comes first
    out = tmp_path / "no" / "such" / "report"
    monkeypatch.setattr(sys, "argv", ["convert_report.py", str(tmp_path / "run"), "--out", str(out)])
    with pytest.raises(SystemExit) as e:
        load_script(BENCHMARKS / "convert_report.py").main()
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and f"no directory {out.parent}" in err


@pytest.mark.parametrize(
    "script, text, message",
    [
        ("convert_report.py", "{}", "expected the summary ttt convert writes"),
        ("convert_report.py", "{not json", "not JSON"),
        ("convert_report.py", '{"args": {"teacher": "t", "corpus": "c"}}', "no 'blocks'"),
        ("convert_context_probe.py", "{}", "expected the summary ttt convert writes"),
        ("convert_context_probe.py", "[1, 2]", "expected the summary ttt convert writes"),
    ],
)
def test_a_hand_edited_convert_json_is_one_line(tmp_path, monkeypatch, capsys, script, text, message):
    """A run's convert.json that is not what ttt convert wrote was a KeyError or JSONDecodeError traceback."""
    from ttt.testing import load_script

    (tmp_path / "run" / "hf").mkdir(parents=True)
    (tmp_path / "run" / "convert.json").write_text(text)
    monkeypatch.setattr(sys, "argv", [script, str(tmp_path / "run"), "--out", str(tmp_path / "report")])
    with pytest.raises(SystemExit) as e:
        load_script(BENCHMARKS / script).main()
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and message in err and "convert.json" in err
    assert not list(tmp_path.glob("report*"))
