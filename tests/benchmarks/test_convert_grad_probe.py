"""benchmarks/convert_grad_probe.py on a tiny conversion: it draws the batches the run drew after the
checkpoint (the windows' mean loss is the loss the run logged at the next step), and its groups split the
gradient exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ttt.testing import load_script

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "convert_grad_probe.py"


@pytest.mark.parametrize("start", [1, 2])  # the end of transfer (a fresh distillation sampler), and within it
def test_the_probe_sees_the_runs_next_batches_and_splits_their_gradient(tmp_path, tiny_conversion, start):
    run = tiny_conversion("run", mixer="gated_deltanet", distill_steps=2, keep_checkpoints=0)
    probe = load_script(SCRIPT)
    probe.main([str(run / f"step-{start:06d}"), "--steps", "1", "--spike", "1.5",
                "--out", str(tmp_path / "out" / "grad")])  # fmt: skip
    report = json.loads((tmp_path / "out" / "grad.json").read_text())
    rows = report["rows"]
    assert [(r["step"], r["window"]) for r in rows] == [(start + 1, 0), (start + 1, 1)]
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    loss = next(r["loss"] for r in logged if r["kind"] == "distill" and r["step"] == start + 1)
    assert sum(r["loss"] for r in rows) / 2 == pytest.approx(loss, rel=1e-5)
    for r in rows:
        assert sum(v * v for v in r["groups"].values()) == pytest.approx(r["norm"] ** 2, rel=1e-9)
    assert {"0 mixer.g_proj", "1 mlp", "0 norms", "embed"} <= set(rows[0]["groups"])
    assert "| group | share |" in (tmp_path / "out" / "grad.md").read_text()


def test_bad_arguments_are_one_line(tiny_conversion):
    run = tiny_conversion("run", distill_steps=0, transfer_steps=2, keep_checkpoints=0)
    probe = load_script(SCRIPT)
    # its next steps are transfer's: the probe drew distillation's batches and labelled them as those steps
    with pytest.raises(
        SystemExit, match=r"within attention transfer \(step 1\): give one at or after step 2$"
    ):
        probe.main([str(run / "step-000001")])
    with pytest.raises(SystemExit, match="^--steps must be >= 1, got 0$"):
        probe.main([str(run / "step-000001"), "--steps", "0"])
    with pytest.raises(SystemExit, match="^--spike must be > 1, got 1.0$"):
        probe.main([str(run / "step-000001"), "--spike", "1"])
    with pytest.raises(SystemExit, match="is not a checkpoint of a ttt convert run"):
        probe.main([str(run / "hf")])
