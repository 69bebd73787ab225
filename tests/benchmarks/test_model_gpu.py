"""benchmarks/model_gpu.py runs end to end on CPU at tiny sizes (a smoke test of every phase and mixer)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ttt.testing import load_script

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "model_gpu.py"


def test_every_mixer_and_phase_runs_on_cpu(tmp_path, monkeypatch):
    import ttt.models.static_decode as sd

    # the suite runs Triton under its interpreter on CPU: far too slow for a smoke test of the script
    monkeypatch.setattr(sd, "_triton_decode", lambda layer, device: None)
    bench = load_script(SCRIPT)
    args = ["--device", "cpu", "--presets", "micro", "--train-lengths", "16", "--tokens-per-step", "32",
            "--train-steps", "1", "--contexts", "16", "--prefill-repeats", "1", "--decode-tokens", "2",
            "--out", str(tmp_path)]  # fmt: skip
    cases = bench.main(args)
    assert {c.mixer for c in cases} == set(bench.MIXERS)
    bad = [(c.mixer, c.phase, c.status) for c in cases if c.status != "ok"]
    assert not bad, bad
    assert {c.phase for c in cases} == {"gate", "train", "prefill", "decode"}
    saved = json.loads((tmp_path / "model_gpu.json").read_text())
    assert len(saved["cases"]) == len(cases)
    text = (tmp_path / "model_gpu.md").read_text()
    assert "command:" in text and "device: CPU" in text


def test_budget_and_flops_formulas(tmp_path):
    bench = load_script(SCRIPT)
    cases = bench.main(["--device", "cpu", "--presets", "micro", "--mixers", "attention", "--budget", "0",
                        "--out", str(tmp_path)])  # fmt: skip
    assert [c.status for c in cases] == ["skipped: budget"]
    from ttt.models import LMConfig

    config = LMConfig.from_name("micro")
    # causal attention: 4 C (T + 1) / 2; a window as long as T is full attention
    assert bench.mixing_flops("attention", config, 8, 2048) == 4 * 32 * 9 / 2
    assert bench.mixing_flops("swa", config, 8, 8) == bench.mixing_flops("attention", config, 8, 8)
    assert bench.mixing_flops("swa", config, 100, 4) == pytest.approx(4 * 32 * (10 + 96 * 4) / 100)
    with pytest.raises(ValueError, match="no FLOPs formula"):
        bench.mixing_flops("hebbian", config, 8, 8)


def test_a_static_decoder_that_fails_its_gate_is_not_timed(tmp_path, monkeypatch):
    bench = load_script(SCRIPT)

    class Wrong(bench.StaticDecoder):
        def step(self, token):
            return super().step(token) + 1.0

    monkeypatch.setattr(bench, "StaticDecoder", Wrong)
    cases = bench.main(["--device", "cpu", "--presets", "micro", "--mixers", "attention", "--phases", "infer",
                        "--contexts", "16", "--prefill-repeats", "1", "--decode-tokens", "2",
                        "--out", str(tmp_path)])  # fmt: skip
    gate, prefill, decode = cases
    assert gate.status == "ok" and gate.extra["static"] == "failed"  # CausalLM.step passed: timed
    assert decode.status == "ok" and decode.tokens_per_s is None and decode.extra["step_path_ms"] > 0
    assert "static decoder failed its gate" in (tmp_path / "model_gpu.md").read_text()


def test_mixer_kwargs_reach_the_layers_and_the_forms_they_ran_are_recorded(tmp_path):
    bench = load_script(SCRIPT)
    cases = bench.main(["--device", "cpu", "--presets", "micro", "--mixers", "gated_deltanet", "--phases", "train",
                        "--train-lengths", "16", "--tokens-per-step", "32", "--train-steps", "1",
                        "--mixer-kwargs", '{"gated_deltanet": {"impl": "recurrent"}}',
                        "--out", str(tmp_path)])  # fmt: skip
    gate, train = cases
    assert train.status == "ok" and train.extra["impl"] == "recurrent"
    assert "forms: recurrent" in (tmp_path / "model_gpu.md").read_text()


def test_bad_mixer_kwargs_are_a_one_line_error(capsys):
    bench = load_script(SCRIPT)
    with pytest.raises(SystemExit):
        bench.parse_args(["--mixer-kwargs", '{"no_such_mixer": {}}'])
    assert "unknown mixers ['no_such_mixer']" in capsys.readouterr().err
