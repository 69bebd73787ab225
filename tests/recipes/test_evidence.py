"""The evidence recipes: the period statistics against constructed signals, the resumable cache, and each
recipe's ``--quick`` mode end to end on a small generated corpus (what CI runs)."""

from __future__ import annotations

import json
import math
import random
from unittest import mock

import pytest
import torch

from ttt.recipes.evidence import kv_binding, ladder, long_context, minibatch_period, mqar_grid, state_probe
from ttt.recipes.evidence.stats import boundary_excess, detrended_phase_profile, mean_spread


def test_phase_profile_recovers_a_periodic_signal_and_cancels_a_trend():
    """loss = trend + periodic part: the profile is the periodic part minus its mean, for a linear trend
    (a centred moving average of width 16 reproduces a line exactly) and a constant."""
    period = torch.zeros(16, dtype=torch.float64)
    period[[15, 0, 1]] = 0.5
    positions = torch.arange(256, dtype=torch.float64)
    loss = 2.0 - 0.001 * positions + period[positions.long() % 16]
    profile = detrended_phase_profile(loss, 16)
    torch.testing.assert_close(profile, period - period.mean(), atol=1e-12, rtol=0)
    assert boundary_excess(profile) == pytest.approx(0.5, abs=1e-12)
    flat = detrended_phase_profile(3.0 - 0.01 * positions, 16)
    assert flat.abs().max() < 1e-12 and boundary_excess(flat) == pytest.approx(0.0, abs=1e-12)


def test_mean_spread():
    assert mean_spread([1.0]) == (1.0, 0.0)
    m, s = mean_spread([1.0, 2.0, 3.0])
    assert m == 2.0 and s == pytest.approx(1.0)
    assert math.isnan(mean_spread([float("nan"), 1.0])[0])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = random.Random(0)
    words = "the of and to in a is that for it as with was on be by this are or from at an".split()
    path = tmp_path_factory.mktemp("corpus") / "small.txt"
    path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(400)))
    return str(path)


def test_minibatch_period_quick_writes_outputs_and_resumes(tmp_path, corpus):
    argv = ["--quick", "--seeds", "0", "--corpus", corpus, "--out", str(tmp_path)]
    summary = minibatch_period.main(argv)
    assert set(summary) == {"linear-default", "linear-eta-const"}
    assert len(summary["linear-default"]["phase_profile_bits_ctx512"]) == 16
    payload = json.loads((tmp_path / "minibatch_period.json").read_text())
    assert len(payload["records"]) == 2 and (tmp_path / "minibatch_period.md").exists()
    cached = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert cached == ["linear-default-lr0.003-s0.json", "linear-eta-const-lr0.003-s0.json"]
    # the report names each run's file for its per-position losses instead of repeating them
    assert sorted(r["by_position"] for r in payload["records"]) == [f"cache/{name}" for name in cached]
    assert all(
        json.loads((tmp_path / r["by_position"]).read_text())["by_position"] for r in payload["records"]
    )
    stamp = (tmp_path / "cache" / cached[0]).stat().st_mtime_ns
    minibatch_period.main([*argv, "--report-only"])  # from the cache: nothing retrained
    assert (tmp_path / "cache" / cached[0]).stat().st_mtime_ns == stamp


@pytest.mark.parametrize("recipe", [long_context, ladder, kv_binding])
def test_lm_recipes_quick(tmp_path, corpus, recipe):
    summary = recipe.main(["--quick", "--seeds", "0", "--corpus", corpus, "--out", str(tmp_path)])
    assert len(summary) == 2 and all(s["num_params"] > 0 for s in summary.values())
    assert (tmp_path / f"{recipe.NAME}.md").exists() and (tmp_path / f"{recipe.NAME}.json").exists()


def test_mqar_grid_quick(tmp_path):
    result = mqar_grid.main(["--quick", "--out", str(tmp_path)])
    labels = [r["label"] for r in result["records"]]
    assert labels == ["ttt_linear", "ttt_linear+conv", "attention", "attention+conv"]
    assert all(r["state_bytes"] > 0 and 0 <= r["accuracy"][0] <= 1 for r in result["records"])
    md = (tmp_path / "mqar_grid.md").read_text()
    assert "| T=32,D=2 |" in md and "seed 0 by lr" in md  # a column per slice, the lr grid of seed 0
    assert (tmp_path / "mqar_grid.png").exists() and (tmp_path / "mqar_grid_hardest.png").exists()


def test_mqar_grid_conv_switches():
    names = [label for label, _, _ in mqar_grid.variants(["ttt_mlp", "gated_deltanet", "attention"])]
    assert names == [
        "ttt_mlp",
        "ttt_mlp+conv",
        "gated_deltanet",
        "gated_deltanet-conv",
        "attention",
        "attention+conv",
    ]


def test_state_probe_quick(tmp_path):
    results = state_probe.main(["--quick", "--out", str(tmp_path)])
    plain, reset = results["plain"], results["reset 32"]
    # the first band is the same computation with and without the reset
    assert plain["loss"][:32] == pytest.approx(reset["loss"][:32], abs=1e-6)
    assert len(plain["drift"]) == 128 // plain["mini_batch_size"]
    # the report names the command that made it, arguments included (they were dropped from the command
    # line when the module ran as a script)
    want = f"python -m ttt.recipes.evidence.state_probe --quick --out {tmp_path}"
    assert f"Command: `{want}`" in (tmp_path / "state_probe.md").read_text()
    with mock.patch("sys.argv", ["state_probe.py", "--quick", "--out", str(tmp_path)]):
        state_probe.main()
    assert f"Command: `{want}`" in (tmp_path / "state_probe.md").read_text()


def test_state_probe_reset_and_decay_act_on_the_fast_weights():
    """A reset every 32 tokens scores tokens 32.. as a fresh window would; decay 0 keeps W at W0."""
    from ttt.models import CausalLM, LMConfig

    torch.manual_seed(0)
    model = CausalLM(LMConfig.from_name("micro", vocab_size=64)).eval()
    windows = torch.randint(0, 64, (2, 65), generator=torch.Generator().manual_seed(1))
    reset = state_probe.probe(model, windows, band=32, reset_every=32)
    fresh = state_probe.probe(model, windows[:, 32:], band=32)
    assert reset["loss"][32:] == pytest.approx(fresh["loss"], abs=3e-5)
    assert reset["drift"][2:] == pytest.approx(fresh["drift"], abs=3e-5)
    frozen = state_probe.probe(model, windows, band=32, decay=0.0)
    assert max(frozen["drift"]) == 0.0


@pytest.mark.parametrize("mixer", ["ttt_linear", "ttt_mlp"])
def test_specs_mean_the_layer_defaults_not_ttt_trains(tmp_path, mixer):
    """A spec without ``share_qk`` is the layer's own default (no short convolutions), although ``ttt train``
    turns them on by default; a spec that sets it keeps its value."""
    from ttt.recipes.evidence.common import RunSpec, Scale, train_args
    from ttt.recipes.train import train_mixer_kwargs

    plain = train_args(RunSpec("x", mixer), Scale(), 1e-3, 0, tmp_path)
    assert train_mixer_kwargs(plain)[mixer]["share_qk"] is False
    # and the model is sized to the plain attention layer, as every cached run was
    assert train_mixer_kwargs(plain)["attention"] == {"conv_size": 0}
    conv = train_args(
        RunSpec("y", mixer, {"share_qk": True, "mini_batch_size": 4}), Scale(), 1e-3, 0, tmp_path
    )
    assert train_mixer_kwargs(conv)[mixer] == {"share_qk": True, "mini_batch_size": 4}


@pytest.mark.parametrize(
    "recipe, argv, message",
    [
        (long_context, ["--lrs", "abc"], "--lrs"),
        (long_context, ["--lrs", "-1"], "--lrs"),
        (long_context, ["--lrs", ","], "--lrs"),
        (long_context, ["--seeds", "x"], "--seeds"),
        (long_context, ["--seeds", ""], "--seeds"),
        (long_context, ["--only", "nope"], "--only"),
        # mqar_grid's own options (an unknown --only label used to write empty tables; the others ended
        # in tracebacks)
        (mqar_grid, ["--only", "nope"], "--only: unknown label(s) nope; choose from"),
        (mqar_grid, ["--widths", "x"], "expected positive integers"),
        (mqar_grid, ["--widths", "0"], "expected positive integers"),
        (mqar_grid, ["--mixers", "foo"], "unknown mixer 'foo'"),
        (mqar_grid, ["--train-examples", "0"], "--train-examples must be >= 1"),
        (mqar_grid, ["--seq-len", "64,x"], "--seq-len: expected comma-separated integers"),
        (mqar_grid, ["--vocab", "10"], "vocab_size must be larger than seq_len"),
        # --threads 0 ended in a traceback (torch's, then set_threads')
        (long_context, ["--threads", "0"], "argument --threads: expected a positive integer, got '0'"),
        (mqar_grid, ["--threads", "0"], "argument --threads: expected a positive integer, got '0'"),
        (state_probe, ["--threads", "0"], "argument --threads: expected a positive integer, got '0'"),
    ],
)
def test_bad_grid_arguments_stop_with_one_line(tmp_path, capsys, recipe, argv, message):
    """One line naming the option; nothing trained or written."""
    with pytest.raises(SystemExit) as exc:
        recipe.main([*argv, "--report-only", "--out", str(tmp_path / "out")])
    text = str(exc.value.code) if isinstance(exc.value.code, str) else capsys.readouterr().err
    assert message in text and "\n" not in text.strip().splitlines()[-1], text
    assert not (tmp_path / "out").exists()


def test_mqar_grid_report_only_skips_runs_made_with_other_options(tmp_path):
    """--report-only used to report any cached file of the right name, whatever options made it."""
    tiny = ["--mixers", "linear_attention", "--widths", "16", "--seq-len", "32", "--num-kv", "2", "--vocab", "64",
            "--train-examples", "16", "--test-examples", "8", "--seeds", "0", "--out", str(tmp_path)]  # fmt: skip
    assert len(mqar_grid.main([*tiny, "--epochs", "1"])["records"]) == 1
    assert len(mqar_grid.main([*tiny, "--epochs", "1", "--report-only"])["records"]) == 1
    assert mqar_grid.main([*tiny, "--epochs", "2", "--report-only"])["records"] == []


def test_a_hand_edited_cache_file_stops_with_one_line(tmp_path):
    mqar_grid.main(["--quick", "--out", str(tmp_path)])
    broken = sorted((tmp_path / "cache").iterdir())[0]
    broken.write_text('{"label": "ttt_linear", ')  # cut short by hand (or by a full disk)
    with pytest.raises(SystemExit) as exc:
        mqar_grid.main(["--quick", "--out", str(tmp_path), "--report-only"])
    text = str(exc.value.code)
    assert str(broken) in text and "not a JSON run record" in text and "\n" not in text
    assert broken.read_text() == '{"label": "ttt_linear", '  # left as it was


def _hold(lock_path):
    """Lock ``lock_path`` as another process training that run would (``flock``, released on close)."""
    import fcntl

    lock_path.parent.mkdir(parents=True, exist_ok=True)
    f = open(lock_path, "w")
    f.write("otherhost 4242\n")
    f.flush()
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return f


def test_mqar_grid_skips_a_run_another_process_is_training(tmp_path, capsys):
    """Two grid processes on one --out used to train the same run twice (a wasted run, and a race on its
    cache file). A run locked by another process is now skipped, with the other seeds of its setting."""
    holder = _hold(tmp_path / "cache" / "ttt_linear-d16-lr0.001-s0.lock")
    try:
        result = mqar_grid.main(["--quick", "--out", str(tmp_path)])
    finally:
        holder.close()
    assert [r["label"] for r in result["records"]] == ["ttt_linear+conv", "attention", "attention+conv"]
    assert not (tmp_path / "cache" / "ttt_linear-d16-lr0.001-s0.json").exists()
    err = capsys.readouterr().err
    assert "ttt_linear-d16-lr0.001-s0" in err and "otherhost 4242" in err
    # once it is free (the holder ended, even killed: its lock file stays) the run trains, and the
    # lock file goes
    result = mqar_grid.main(["--quick", "--out", str(tmp_path)])
    assert [r["label"] for r in result["records"]] == [
        "ttt_linear",
        "ttt_linear+conv",
        "attention",
        "attention+conv",
    ]
    assert not list((tmp_path / "cache").glob("*.lock"))


def test_lm_sweep_skips_a_run_another_process_is_training(tmp_path, corpus, capsys):
    argv = ["--quick", "--seeds", "0", "--corpus", corpus, "--out", str(tmp_path)]
    holder = _hold(tmp_path / "cache" / "linear-default-lr0.003-s0.lock")
    try:
        summary = minibatch_period.main(argv)
    finally:
        holder.close()
    assert set(summary) == {"linear-eta-const"}
    assert not (tmp_path / "ckpt" / "linear-default-lr0.003-s0").exists()  # its run directory untouched
    assert "linear-default-lr0.003-s0" in capsys.readouterr().err


def test_lm_report_only_skips_runs_made_with_another_spec(tmp_path, corpus):
    """The report read any cached record at the right scale, whatever mixer settings made it."""
    from ttt.recipes.evidence.common import Scale, sweep

    argv = ["--quick", "--seeds", "0", "--corpus", corpus, "--out", str(tmp_path)]
    minibatch_period.main(argv)
    path = tmp_path / "cache" / "linear-default-lr0.003-s0.json"
    record = json.loads(path.read_text())
    record["spec"]["mixer_kwargs"] = {"mini_batch_size": 4}  # made by an older meaning of the label
    path.write_text(json.dumps(record))
    scale = Scale(**{**record["scale"], "eval_contexts": tuple(record["scale"]["eval_contexts"])})
    records = sweep(
        minibatch_period.SPECS, lrs=[0.003], seeds=[0], scale=scale, out=tmp_path, report_only=True
    )
    assert [r["spec"]["label"] for r in records] == ["linear-eta-const"]


def test_run_lock_never_holds_a_lock_file_that_was_replaced(tmp_path, monkeypatch):
    """The holder deletes its lock file as it lets go; a process that opened that file just before could
    lock the deleted file while a third process locks the new one: two holders, one run trained twice
    (the holder had failed, so no record stopped them). Found in review."""
    import fcntl

    from ttt.recipes.evidence import cache as cache_mod

    cache = tmp_path / "cache" / "run-lr0.001-s0.json"
    lock = cache.with_suffix(".lock")
    lock.parent.mkdir(parents=True)
    lock.write_text("")  # the old holder's file, about to be deleted
    real_flock, third = fcntl.flock, []

    def flock_after_the_swap(f, op):
        if not third:  # between this process's open and its flock: the old holder lets go, a third locks
            lock.unlink()
            third.append(open(lock, "w"))
            third[0].write("otherhost 4242\n")
            third[0].flush()
            real_flock(third[0], fcntl.LOCK_EX | fcntl.LOCK_NB)
        return real_flock(f, op)

    monkeypatch.setattr(fcntl, "flock", flock_after_the_swap)
    try:
        with pytest.raises(cache_mod.RunBusy, match="otherhost 4242"):
            with cache_mod.run_lock(cache):
                pass
    finally:
        third[0].close()


def test_mqar_grid_reports_what_is_cached_after_a_busy_setting(tmp_path):
    """A setting skipped as busy (here at seed 1) vanished from the report even with seed 0 cached, so the
    last of two processes to finish overwrote the report without it. Found in review."""
    tiny = ["--mixers", "linear_attention", "--widths", "16", "--seq-len", "32", "--num-kv", "2", "--vocab", "64",
            "--train-examples", "16", "--test-examples", "8", "--epochs", "1", "--seeds", "0,1",
            "--out", str(tmp_path)]  # fmt: skip
    holder = _hold(tmp_path / "cache" / "linear_attention-d16-lr0.001-s1.lock")
    try:
        result = mqar_grid.main(tiny)
    finally:
        holder.close()
    assert [(r["label"], r["seeds"]) for r in result["records"]] == [("linear_attention", [0])]
