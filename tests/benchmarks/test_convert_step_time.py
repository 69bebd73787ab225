"""benchmarks/convert_step_time.py on a tiny conversion: both stages in both modes, from a checkpoint's
own student, teacher and batch shape, with losses that agree across the modes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from ttt.testing import load_script

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "convert_step_time.py"


def test_both_stages_timed_in_both_modes(tmp_path, tiny_conversion):
    run = tiny_conversion("run", mixer="gated_deltanet", distill_steps=0)
    timer = load_script(SCRIPT)
    timer.main([str(run / "step-000001"), "--repeats", "2", "--out", str(tmp_path / "out" / "steps")])
    rows = json.loads((tmp_path / "out" / "steps.json").read_text())["rows"]
    assert [(r["stage"], r["dtype"]) for r in rows] == [
        ("transfer", "float32"), ("transfer", "bfloat16"), ("distill", "float32"), ("distill", "bfloat16"),
        ("matmul", "float32"), ("matmul", "bfloat16"),
    ]  # fmt: skip
    assert all(len(r["seconds"]) == 2 and r["median_s"] > 0 and math.isfinite(r["loss"]) for r in rows)
    for f32, b16 in zip(rows[:4:2], rows[1:4:2]):  # the two stages (the matmul row sums random numbers)
        assert b16["loss"] == pytest.approx(f32["loss"], rel=0.05)
    assert "| distill | bfloat16 |" in (tmp_path / "out" / "steps.md").read_text()
    with pytest.raises(SystemExit, match="--repeats must be >= 1, got 0"):
        timer.main([str(run / "step-000001"), "--repeats", "0"])


def test_a_checkpoint_without_a_conversion_and_zero_threads_are_one_line(tiny_conversion):
    """The HF directory of a conversion (no conversion summary) failed with KeyError 'summary'; --threads 0
    with torch's RuntimeError after the arguments were read."""
    run = tiny_conversion("run", distill_steps=0)
    timer = load_script(SCRIPT)
    with pytest.raises(
        SystemExit, match=r"is not a checkpoint of a ttt convert run .*: give RUN or RUN/step-N$"
    ):
        timer.main([str(run / "hf"), "--repeats", "1"])
    with pytest.raises(SystemExit, match="^--threads must be >= 1, got 0$"):
        timer.main([str(run), "--threads", "0"])
