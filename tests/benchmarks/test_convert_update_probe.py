"""benchmarks/convert_update_probe.py on a tiny conversion: the empty update scores the earlier
checkpoint, the whole update the later one, and every row is finite."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from ttt.testing import load_script

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "convert_update_probe.py"


def test_parts_of_an_update_between_the_two_checkpoints(tmp_path, tiny_conversion):
    run = tiny_conversion("run", mixer="ttt_linear", distill_steps=2, distill_lr=1e-2)
    probe = load_script(SCRIPT)
    rows = probe.probe(run, "step-000002", "step-000003", windows=2, per_block="mixer.o_proj.weight",
                       blocks=[0], controls=["blocks.0.mixer.o_proj.weight"])  # fmt: skip
    by = {r["row"]: r["perplexity"] for r in rows}
    assert all(math.isfinite(v) for v in by.values())
    assert by["blocks.0.mixer.o_proj.weight: the update"] == pytest.approx(by["blocks.0.mixer.o_proj.weight"])
    assert "mixer.o_proj.weight of the 1 other blocks" in by and "non-mixer" in by
    assert by["step-000002"] != pytest.approx(by["all"], rel=1e-6)  # the update changed something
    # a whole module block by block, and every block's update but one: with two blocks, "all but block 0"
    # is block 1's update, the same as "the other blocks"
    whole = probe.probe(run, "step-000002", "step-000003", windows=2, per_block="mixer", blocks=[0],
                        controls=[], leave_out=True)  # fmt: skip
    w = {r["row"]: r["perplexity"] for r in whole}
    assert w["mixer of every block but 0"] == pytest.approx(w["mixer of the 1 other blocks"], rel=1e-6)
    assert math.isfinite(w["all mixer but mixer.o_proj.weight"])  # and every mixer group's update but one
    assert math.isfinite(w["blocks.0.mixer but blocks.0.mixer.o_proj.weight"])  # and block 0's but one tensor
    more = w["blocks.0.mixer"]  # the whole mixer's update: more than its o_proj's
    assert more != pytest.approx(by["blocks.0.mixer.o_proj.weight"], rel=1e-6)
    # "all" is the later checkpoint itself
    again = probe.probe(
        run, "step-000003", "step-000003", windows=2, per_block=None, blocks=None, controls=[]
    )
    assert again[0]["perplexity"] == pytest.approx(by["all"], rel=1e-5)
    probe.main([str(run), "--before", "step-000002", "--after", "step-000003", "--windows", "1",
                "--out", str(tmp_path / "out" / "probe")])  # fmt: skip
    assert json.loads((tmp_path / "out" / "probe.json").read_text())["rows"][0]["row"] == "step-000002"
