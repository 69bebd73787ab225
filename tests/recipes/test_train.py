"""The training recipe: smoke run, exact resume, atomic checkpoints, refusing to overwrite."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ttt.models.checkpoint import CheckpointError, find_checkpoint, load_checkpoint
from ttt.recipes.args import TrainArgs
from ttt.recipes.train import lr_at, train


def small_args(corpus_dir: str, out: Path, **kw) -> TrainArgs:
    base = dict(
        mixer="ttt_linear",
        preset="micro",
        corpus=corpus_dir,
        steps=3,
        batch_size=4,
        context=24,
        eval_every=2,
        eval_batches=2,
        ckpt_every=2,
        out=str(out),
        progress=False,
        plot=False,
    )
    return TrainArgs(**{**base, **kw})


def assert_resumed_equals_straight(straight, resumed, run_a, run_b) -> None:
    """A resumed 6-step run logs the same losses and ends with the same weights as the straight one."""
    assert [s for s, _ in resumed.history["train"]] == list(range(1, 7))
    for (_, x), (_, y) in zip(straight.history["train"], resumed.history["train"]):
        assert abs(x - y) <= 1e-6
    wa, _, _ = load_checkpoint(run_a)
    wb, _, _ = load_checkpoint(run_b)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=0)


def test_three_step_smoke_run(corpus_dir, tmp_path):
    r = train(small_args(corpus_dir, tmp_path / "run", plot=True))
    assert r.step == 3 and len(r.history["train"]) == 3 and len(r.history["val"]) == 2
    assert 0 < r.val_bits_per_byte < 10
    assert find_checkpoint(tmp_path / "run").name == "step-000003"
    assert (tmp_path / "run" / "loss_curve.png").stat().st_size > 1000
    # the plots are readable like every other output (a temporary file's 0600 must not leak into them)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "run").rglob("*") if p.is_file()}
    assert modes["loss_curve.png"] == modes["result.json"] == 0o644, modes


@pytest.mark.parametrize("mixer", ["ttt_linear", "attention"])
def test_a_run_made_before_a_default_changed_resumes_as_it_was_made(corpus_dir, tmp_path, mixer, monkeypatch):
    """`ttt train`'s mixer defaults (short convolutions) apply to new runs; a run made before one changed
    continues with the settings it was made with (its checkpoint's config), not refused as 'another model'."""
    import ttt.recipes.train as recipe
    from ttt.models.checkpoint import load_model

    monkeypatch.setattr(recipe, "TRAIN_MIXER_DEFAULTS", {})  # the defaults of an older version
    train(small_args(corpus_dir, tmp_path / "old", mixer=mixer, steps=2))
    monkeypatch.undo()
    resumed = train(small_args(corpus_dir, tmp_path / "old", mixer=mixer, steps=4, resume=True))
    assert resumed.step == 4
    model, _ = load_model(tmp_path / "old")
    assert model.config.mixer_kwargs == {}
    # a new run gets today's defaults
    train(small_args(corpus_dir, tmp_path / "new", mixer=mixer, steps=1))
    assert load_model(tmp_path / "new")[0].config.mixer_kwargs == recipe.train_mixer_kwargs(
        TrainArgs(mixer=mixer)
    )


def test_resume_checks_arguments_that_go_together_after_taking_the_checkpoints(corpus_dir, tmp_path):
    """--resume takes the arguments not given from the checkpoint; checks that read several arguments
    (here --mixer-kwargs against the mixers) must see those, not the defaults."""
    kwargs = '{"swa": {"window": 8}}'
    train(small_args(corpus_dir, tmp_path / "r", mixer="swa", mixer_kwargs=kwargs, steps=2))
    # the same --mixer-kwargs given again, --mixer left out (its default is ttt_linear)
    resumed = train(small_args(corpus_dir, tmp_path / "r", mixer_kwargs=kwargs, steps=4, resume=True))
    assert resumed.step == 4


@pytest.mark.parametrize("mixer", ["ttt_linear", "attention"])
def test_resume_continues_exactly(corpus_dir, tmp_path, mixer):
    straight = train(small_args(corpus_dir, tmp_path / "a", mixer=mixer, steps=6, ckpt_every=3))
    train(small_args(corpus_dir, tmp_path / "b", mixer=mixer, steps=6, ckpt_every=3))
    # simulate the interruption: drop the final checkpoint, keep the one of step 3
    b = tmp_path / "b"
    (b / "latest").write_text("step-000003\n")
    resumed = train(small_args(corpus_dir, b, mixer=mixer, steps=6, ckpt_every=3, resume=True))
    assert_resumed_equals_straight(straight, resumed, tmp_path / "a", b)


def test_existing_run_is_not_overwritten(corpus_dir, tmp_path):
    train(small_args(corpus_dir, tmp_path / "run"))
    before = (find_checkpoint(tmp_path / "run") / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="--resume"):
        train(small_args(corpus_dir, tmp_path / "run"))
    with pytest.raises(CheckpointError, match="--lr"):
        train(small_args(corpus_dir, tmp_path / "run", resume=True, lr=1.0))
    with pytest.raises(CheckpointError, match="--mixer"):
        train(small_args(corpus_dir, tmp_path / "run", resume=True, mixer="attention"))
    assert (find_checkpoint(tmp_path / "run") / "model.safetensors").read_bytes() == before


def test_bad_arguments(corpus_dir, tmp_path):
    with pytest.raises(ValueError, match="max_seq_len"):
        train(small_args(corpus_dir, tmp_path / "x", context=600))
    with pytest.raises(ValueError, match="unknown mixer"):
        train(small_args(corpus_dir, tmp_path / "x", mixer="nope"))
    with pytest.raises(ValueError, match="unknown preset"):
        train(small_args(corpus_dir, tmp_path / "x", preset="huge"))
    with pytest.raises(ValueError, match="unknown corpus"):
        train(small_args(corpus_dir, tmp_path / "x", corpus="nope"))
    with pytest.raises(CheckpointError, match="does not exist"):
        train(small_args(corpus_dir, tmp_path / "never", resume=True))
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"lr": float("inf")}, "--lr must be a finite number > 0, got inf"),
        ({"lr": -1.0}, "--lr must be a finite number > 0, got -1.0"),
        ({"min_lr": -1e-5}, r"--min-lr must lie in \[0, --lr\], got -1e-05"),
        ({"min_lr": 1.0}, r"--min-lr must lie in \[0, --lr\], got 1.0"),
        ({"warmup": -0.5}, "--warmup must be a finite number >= 0"),
        ({"warmup": 10, "steps": 5}, r"--warmup 10 steps is longer than the run \(--steps 5\)"),
        ({"weight_decay": -0.1}, "--weight-decay must be a finite number >= 0"),
        ({"grad_clip": -1.0}, r"--grad-clip must be a finite number >= 0 \(0: off\)"),
        ({"grad_clip": float("nan")}, r"--grad-clip must be a finite number >= 0 \(0: off\), got nan"),
        # each 0 says what it means for its own flag (--log-every said "only at the end")
        ({"log_every": -1}, r"--log-every must be >= 0 \(0: validations only\), got -1"),
        ({"eval_every": -1}, r"--eval-every must be >= 0 \(0: only at the end\), got -1"),
        ({"context_parallel": 0}, r"--context-parallel must be >= 1, got 0"),
        ({"dtype": "float16"}, r"--dtype must be 'float32' or 'bfloat16' \(autocast\), got 'float16'"),
        (
            {"layer_mixers": "ttt_linear,attention,swa"},
            r"\(--layer-mixers\) has 3 entries: give one per block \(2\)",
        ),
    ],
)
def test_bad_optimizer_numbers_are_refused_before_anything_is_written(corpus_dir, tmp_path, change, message):
    """A negative --min-lr (the schedule ended in gradient ascent), --weight-decay or --warmup trained
    silently; an infinite --lr or a NaN --grad-clip failed only when the first checkpoint's metadata was
    written, leaving metrics.jsonl and TensorBoard files."""
    with pytest.raises(ValueError, match=message):
        train(small_args(corpus_dir, tmp_path / "x", **change))
    assert not (tmp_path / "x").exists()


def test_schedule_warms_up_then_decays():
    args = TrainArgs(steps=100, lr=1.0, min_lr=0.1, warmup=0.1)
    lrs = [lr_at(s, args) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] == pytest.approx(0.1, abs=1e-3)


def test_kill_at_any_moment_leaves_a_complete_checkpoint(corpus_dir, tmp_path):
    run = tmp_path / "killed"
    args = small_args(corpus_dir, run, steps=10_000, ckpt_every=1, eval_every=10_000)
    code = (
        "import sys; from ttt.recipes.args import TrainArgs; from ttt.recipes.train import train; "
        f"train(TrainArgs(**{dataclasses.asdict(args)!r}))"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    proc = subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline and len(list(run.glob("step-*"))) < 2:
            time.sleep(0.05)
        # the child writes a checkpoint every step: kill it in the middle of whatever it is doing
        time.sleep(0.37)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert len(list(run.glob("step-*"))) >= 1
    _, meta, trainer = load_checkpoint(run, load_trainer=True)
    assert meta["step"] >= 1 and "rng.sampler" in trainer


def test_corpus_too_small_for_the_context_is_refused_before_training(tmp_path):
    text = tmp_path / "small.txt"
    text.write_text("".join(f"line {i}: a few words of text\n" for i in range(20)))
    with pytest.raises(ValueError, match="too small for --context 128.*validation split"):
        train(small_args(str(text), tmp_path / "run", context=128))
    assert not (tmp_path / "run").exists()


def test_eval_and_ckpt_every_zero_mean_only_at_the_end(corpus_dir, tmp_path):
    for flag in ("eval_every", "ckpt_every", "eval_batches"):
        with pytest.raises(ValueError, match="--" + flag.replace("_", "-")):
            train(small_args(corpus_dir, tmp_path / "x", **{flag: -1}))
    assert not (tmp_path / "x").exists()
    r = train(small_args(corpus_dir, tmp_path / "run", eval_every=0, ckpt_every=0))
    assert [v[0] for v in r.history["val"]] == [3]
    assert [p.name for p in (tmp_path / "run").glob("step-*")] == ["step-000003"]


def test_keep_checkpoints_sets_how_many_stay_and_may_change_on_resume(corpus_dir, tmp_path):
    """Only the two newest stayed, so the checkpoints before a divergence were gone when it was probed."""
    with pytest.raises(ValueError, match=r"^--keep-checkpoints must be >= 0 \(0: keep every one\), got -1"):
        train(small_args(corpus_dir, tmp_path / "x", keep_checkpoints=-1))
    assert not (tmp_path / "x").exists()
    run = tmp_path / "run"
    train(small_args(corpus_dir, run, steps=4, ckpt_every=1, keep_checkpoints=0))
    assert sorted(p.name for p in run.glob("step-*")) == [f"step-00000{i}" for i in (1, 2, 3, 4)]
    more = TrainArgs(out=str(run), resume=True, steps=6, keep_checkpoints=3, progress=False, plot=False)
    assert train(more).step == 6
    assert sorted(p.name for p in run.glob("step-*")) == [f"step-00000{i}" for i in (4, 5, 6)]
    _, meta, _ = load_checkpoint(run)
    assert meta["args"]["keep_checkpoints"] == 3


def test_checkpoint_is_saved_before_validation(corpus_dir, tmp_path, monkeypatch):
    # a checkpoint that was validated records that validation in its history
    train(small_args(corpus_dir, tmp_path / "ok"))
    _, meta, _ = load_checkpoint(tmp_path / "ok")
    assert [v[0] for v in meta["history"]["val"]] == [2, 3]

    def failing(*args, **kwargs):
        raise RuntimeError("validation failed")

    monkeypatch.setattr("ttt.recipes.eval.evaluate_loss", failing)
    with pytest.raises(RuntimeError, match="validation failed"):
        train(small_args(corpus_dir, tmp_path / "run"))
    _, meta, _ = load_checkpoint(tmp_path / "run")
    assert meta["step"] == 2 and len(meta["history"]["train"]) == 2


def test_overwrite_replaces_the_previous_run_and_keeps_other_files(corpus_dir, tmp_path):
    run = tmp_path / "run"
    train(small_args(corpus_dir, run, steps=4, ckpt_every=2, plot=True))
    (run / "notes.txt").write_text("mine")
    # bad arguments: the old run stays as it was
    with pytest.raises(ValueError, match="max_seq_len"):
        train(small_args(corpus_dir, run, overwrite=True, context=600))
    with pytest.raises(ValueError, match="not both"):
        train(small_args(corpus_dir, run, overwrite=True, resume=True))
    assert find_checkpoint(run).name == "step-000004" and (run / "loss_curve.png").exists()
    r = train(small_args(corpus_dir, run, steps=3, ckpt_every=1, overwrite=True))
    assert sorted(p.name for p in run.glob("step-*")) == ["step-000002", "step-000003"]
    _, meta, _ = load_checkpoint(run / "step-000002")
    assert meta["args"]["steps"] == 3 and r.step == 3
    assert not (run / "loss_curve.png").exists() and (run / "notes.txt").read_text() == "mine"
    # a file ttt did not write inside a checkpoint: nothing is deleted
    (run / "step-000003" / "mine.txt").write_text("x")
    with pytest.raises(CheckpointError, match="mine.txt"):
        train(small_args(corpus_dir, run, overwrite=True))
    assert sorted(p.name for p in run.glob("step-*")) == ["step-000002", "step-000003"]


@pytest.mark.parametrize(
    "signum, handler_after",
    [(signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL)],
    ids=["ctrl-c", "sigterm"],
)
def test_a_signal_saves_the_last_step_and_resume_continues_exactly(
    corpus_dir, tmp_path, monkeypatch, signum, handler_after
):
    import ttt.data

    straight = train(small_args(corpus_dir, tmp_path / "a", steps=6, ckpt_every=3))
    real, calls = ttt.data.sample_batch, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            # Ctrl-C / kill while step 5 runs: the step finishes, is saved, then training stops
            signal.raise_signal(signum)
        return real(*args, **kwargs)

    monkeypatch.setattr(ttt.data, "sample_batch", interrupted)
    b = tmp_path / "b"
    with pytest.raises(KeyboardInterrupt):
        train(small_args(corpus_dir, b, steps=6, ckpt_every=3))
    assert find_checkpoint(b).name == "step-000005"
    assert signal.getsignal(signum) is handler_after
    monkeypatch.setattr(ttt.data, "sample_batch", real)
    resumed = train(small_args(corpus_dir, b, steps=6, ckpt_every=3, resume=True))
    assert_resumed_equals_straight(straight, resumed, tmp_path / "a", b)


def test_mixer_kwargs_reach_the_model_and_its_checkpoint(corpus_dir, tmp_path):
    from ttt.models.checkpoint import load_model

    kwargs = '{"ttt_linear": {"share_qk": true}}'
    train(small_args(corpus_dir, tmp_path / "m", mixer_kwargs=kwargs))
    model, _ = load_model(tmp_path / "m")
    # and the --match-params reference's (ttt train's defaults for it), which sized the model
    assert model.config.mixer_kwargs == {"ttt_linear": {"share_qk": True}, "attention": {"conv_size": 4}}
    assert all(block.mixer.share_qk for block in model.blocks)
    for bad, match in [
        ("{share_qk}", "must be JSON"),
        ('{"ttt_linear": 1}', "objects"),
        ('{"nope": {}}', "unknown"),
        # a mixer this run does not build: its settings would be kept in the config and never act
        ('{"ttt_mlp": {"mini_batch_size": 8}}', r"sets \['ttt_mlp'\], which this run does not build"),
    ]:
        with pytest.raises(ValueError, match=match):
            train(small_args(corpus_dir, tmp_path / "bad", mixer_kwargs=bad))
    with pytest.raises(TypeError, match="unknown argument 'sharing' for mixer 'ttt_linear'"):
        train(small_args(corpus_dir, tmp_path / "bad", mixer_kwargs='{"ttt_linear": {"sharing": 1}}'))
    assert not (tmp_path / "bad").exists()


def _poison(monkeypatch, at_call: int, kind: str) -> None:
    """Make the ``at_call``-th training loss NaN (kind 'loss') or its gradient infinite ('grad')."""
    import ttt.recipes.train as recipe

    real, calls = recipe.lm_loss, []

    class InfiniteGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return g * float("inf")

    def poisoned(logits, targets):
        calls.append(1) if torch.is_grad_enabled() else None
        loss = real(logits, targets)
        if torch.is_grad_enabled() and len(calls) >= at_call:
            return loss * float("nan") if kind == "loss" else InfiniteGrad.apply(loss)
        return loss

    monkeypatch.setattr(recipe, "lm_loss", poisoned)


@pytest.mark.parametrize("kind", ["loss", "grad"])
def test_divergence_stops_training_and_keeps_the_last_good_checkpoint(
    corpus_dir, tmp_path, monkeypatch, kind
):
    from ttt.recipes.train import TrainingDiverged

    _poison(monkeypatch, at_call=3, kind=kind)
    run = tmp_path / "run"
    # grad_clip 0: an infinite gradient is not clipped into finite weights
    with pytest.raises(TrainingDiverged, match="diverged at step 3.*'latest' in .* still names step-000002"):
        train(small_args(corpus_dir, run, steps=4, ckpt_every=1, grad_clip=0.0))
    assert find_checkpoint(run).name == "step-000002" and not (run / "result.json").exists()
    state, _, _ = load_checkpoint(run)
    assert all(torch.isfinite(v).all() for v in state.values())
    assert sorted(p.name for p in run.glob("step-*")) == ["step-000001", "step-000002"]


def test_result_json_is_strict_json(corpus_dir, tmp_path):
    import json

    r = train(small_args(corpus_dir, tmp_path / "run"))

    def refuse(token):
        raise ValueError(token)

    result = json.loads((tmp_path / "run" / "result.json").read_text(), parse_constant=refuse)
    assert result["step"] == 3 and result["val_loss"] == r.val_loss


def test_a_run_directory_in_use_is_refused_even_with_overwrite(corpus_dir, tmp_path):
    from ttt.models.checkpoint import RunLocked, lock_run

    run = tmp_path / "run"
    train(small_args(corpus_dir, run))
    before = sorted(p.name for p in run.iterdir())
    with lock_run(run):  # another `ttt train` holds the directory
        for extra in ({}, {"overwrite": True}, {"resume": True, "steps": 5}):
            with pytest.raises(RunLocked, match="in use by another ttt train"):
                train(small_args(corpus_dir, run, **extra))
        assert sorted(p.name for p in run.iterdir()) == sorted([*before, ".lock"])
    assert sorted(p.name for p in run.iterdir()) == before


def test_step_directories_without_latest_are_not_overwritten(corpus_dir, tmp_path):
    run = tmp_path / "run"
    train(small_args(corpus_dir, run, steps=2))
    (run / "latest").unlink()
    before = (run / "step-000002" / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="already holds checkpoints"):
        train(small_args(corpus_dir, run, steps=3, ckpt_every=1))
    with pytest.raises(CheckpointError, match="no 'latest' file"):
        train(small_args(corpus_dir, run, steps=3, resume=True))
    assert sorted(p.name for p in run.glob("step-*")) == ["step-000002"]
    assert (run / "step-000002" / "model.safetensors").read_bytes() == before


def test_a_failed_save_stops_training_without_leftovers(corpus_dir, tmp_path, monkeypatch):
    import errno

    import safetensors.torch

    real, calls = safetensors.torch.save_file, []

    def full_disk_at_the_second_checkpoint(*args, **kwargs):
        calls.append(1)
        if len(calls) > 2:  # model + trainer file of step 1 fit; step 2 does not
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk_at_the_second_checkpoint)
    run = tmp_path / "run"
    with pytest.raises(CheckpointError, match="No space left"):
        train(small_args(corpus_dir, run, ckpt_every=1))
    left = sorted(p.name for p in run.iterdir() if not p.name.startswith("events.out.tfevents"))
    assert left == ["latest", "metrics.jsonl", "step-000001"]


def test_resume_takes_the_stored_arguments_and_extends_steps(corpus_dir, tmp_path, capsys):
    import json

    run = tmp_path / "run"
    first = train(small_args(corpus_dir, run, steps=3, ckpt_every=3))
    # only the machine's options and the new --steps: everything else comes from the checkpoint
    more = train(TrainArgs(out=str(run), resume=True, steps=5, progress=False, plot=False, threads=1))
    out = capsys.readouterr().out
    assert "resumed from step 3 of" in out and "training to step 5" in out
    assert more.step == 5 and [s for s, _ in more.history["train"]] == [1, 2, 3, 4, 5]
    assert more.history["train"][:3] == first.history["train"]
    _, meta, _ = load_checkpoint(run)
    assert meta["step"] == 5 and meta["args"]["steps"] == 5 and meta["args"]["corpus"] == corpus_dir
    with pytest.raises(ValueError, match="below the checkpoint's step 5"):
        train(TrainArgs(out=str(run), resume=True, steps=4))
    # the metrics log holds each step once
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4, 5]
    # a run killed while writing a record, resumed from step 5: the half line and later records go
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 6, "loss": 1.0}\n{"kind": "tra')
    train(TrainArgs(out=str(run), resume=True, steps=6, progress=False, plot=False, threads=1))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]


def test_a_log_file_gets_a_line_every_log_every_steps_and_the_files_written(corpus_dir, tmp_path, capsys):
    import json

    run = tmp_path / "run"
    train(small_args(corpus_dir, run, steps=4, eval_every=0, ckpt_every=0, log_every=2, progress=True))
    out = capsys.readouterr().out
    assert "step 2/4: train loss" in out and "step 4/4: train loss" in out and "step 3/4" not in out
    assert f"wrote {run / 'step-000004'} (latest), result.json, metrics.jsonl" in out and f"in {run}" in out

    def refuse(token):
        raise ValueError(token)

    records = [
        json.loads(line, parse_constant=refuse) for line in (run / "metrics.jsonl").read_text().splitlines()
    ]
    steps = [(r["kind"], r["step"]) for r in records]
    assert steps == [("train", 1), ("train", 2), ("train", 3), ("train", 4), ("val", 4)]
    records = records[:4]
    assert all(r["loss"] > 0 and r["grad_norm"] > 0 and r["lr"] > 0 for r in records)


def test_tensorboard_event_files_when_installed(corpus_dir, tmp_path):
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    train(small_args(corpus_dir, run))
    assert list(run.glob("events.out.tfevents.*"))


def test_one_cpu_thread_by_default_and_the_callers_count_given_back(corpus_dir, tmp_path, capsys):
    """train() ran on one thread and left the process on one: a notebook's own count was lost."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        train(small_args(corpus_dir, tmp_path / "run", steps=1, threads=None))
        assert "1 thread(s)" in capsys.readouterr().out and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("name", [".lock", "metrics.jsonl", "result.json", ".loss_curve.png.x1y2z3.png"])
def test_files_of_the_run_that_are_links_are_refused_and_their_targets_untouched(corpus_dir, tmp_path, name):
    """A run directory from elsewhere may hold links among the files train writes: each was followed, and
    the file it named (outside the run) was truncated or overwritten."""
    run, victim = tmp_path / "run", tmp_path / "victim.txt"
    train(small_args(corpus_dir, run, steps=1, eval_every=0, ckpt_every=1))
    victim.write_text("precious\n")
    (run / name).unlink(missing_ok=True)
    (run / name).symlink_to(victim)
    with pytest.raises(CheckpointError, match=rf"{name.replace('.', '[.]')} is a symbolic link"):
        train(small_args(corpus_dir, run, steps=2, eval_every=0, ckpt_every=1, resume=True, plot=True))
    assert victim.read_text() == "precious\n"
    assert find_checkpoint(run).name == "step-000001"


def test_train_builds_ttt_layers_with_short_convolutions_unless_told_otherwise():
    """`ttt train`'s TTT layers default to share_qk=True and attention / swa to conv_size=4 (docs/results.md);
    --mixer-kwargs gives the official layer back, and other mixers get nothing they did not ask for."""
    from ttt.recipes.train import train_mixer_kwargs

    def kw(**given):
        return train_mixer_kwargs(TrainArgs(**{"match_params": "none", **given}))

    # the --match-params reference (attention by default) gets its defaults too: it sizes the model
    assert kw(mixer="ttt_linear", match_params="attention") == {
        "ttt_linear": {"share_qk": True},
        "attention": {"conv_size": 4},
    }
    assert kw(mixer="ttt_linear") == {"ttt_linear": {"share_qk": True}}
    assert kw(mixer="ttt_mlp") == {"ttt_mlp": {"share_qk": True}}
    assert kw(mixer="attention") == {"attention": {"conv_size": 4}}
    assert kw(mixer="attention", mixer_kwargs='{"attention": {"conv_size": 0}}') == {
        "attention": {"conv_size": 0}
    }
    assert kw(mixer="gated_deltanet") == {}
    assert kw(mixer="ttt_linear", mixer_kwargs='{"ttt_linear": {"share_qk": false}}') == {
        "ttt_linear": {"share_qk": False}
    }
    assert kw(mixer="ttt_linear", mixer_kwargs='{"ttt_linear": {"mini_batch_size": 8}}') == {
        "ttt_linear": {"share_qk": True, "mini_batch_size": 8}
    }
    assert kw(layer_mixers="ttt_mlp,swa", mixer_kwargs='{"swa": {"window": 8}}') == {
        "ttt_mlp": {"share_qk": True},
        "swa": {"conv_size": 4, "window": 8},
    }


def test_a_missing_matplotlib_is_named_with_its_extra(corpus_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    train(small_args(corpus_dir, tmp_path / "run", plot=True))
    out = capsys.readouterr().out
    assert "no loss_curve.png: the loss curve needs matplotlib: pip install 'ttt[plot]'" in out
    assert not (tmp_path / "run" / "loss_curve.png").exists()


def test_sigterm_raises_while_the_run_is_locked_before_the_loop(corpus_dir, tmp_path, monkeypatch):
    """The lock was held while SIGTERM still had its default action (end the process at once): a SIGTERM
    before the loop's handler (data, tokenizer, model) left the .lock behind. Now it raises, as Ctrl-C does,
    and the lock's file and the still empty run directory go."""
    import ttt.recipes.train as recipe

    seen = []
    real = recipe._prepare

    def prepare(run):
        seen.append(signal.getsignal(signal.SIGTERM))
        assert (run.run_dir / ".lock").is_file()
        if len(seen) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(run)

    monkeypatch.setattr(recipe, "_prepare", prepare)
    before = signal.getsignal(signal.SIGTERM)
    train(small_args(corpus_dir, tmp_path / "run", steps=1))
    assert seen[0] not in (signal.SIG_DFL, signal.SIG_IGN, None)
    assert signal.getsignal(signal.SIGTERM) is before  # given back afterwards
    with pytest.raises(KeyboardInterrupt):
        train(small_args(corpus_dir, tmp_path / "run2", steps=1))
    assert not (tmp_path / "run2").exists() and signal.getsignal(signal.SIGTERM) is before


@pytest.mark.parametrize("name", ["result.json", "metrics.jsonl", "loss_curve.png"])
def test_a_fresh_run_never_replaces_files_it_did_not_write(corpus_dir, tmp_path, name):
    """A directory without checkpoints is not a run: its result.json, metrics.jsonl, plots were the user's,
    and a fresh `ttt train --out` there replaced (or truncated) them without a word."""
    run = tmp_path / "mine"
    run.mkdir()
    (run / name).write_text("precious\n")
    for overwrite in (False, True):  # --overwrite deletes only a run's files
        with pytest.raises(FileExistsError, match=f"{run} holds {name}, which no ttt run here wrote"):
            train(small_args(corpus_dir, run, plot=True, overwrite=overwrite))
        assert sorted(p.name for p in run.iterdir()) == [name] and (run / name).read_text() == "precious\n"


def test_a_run_killed_before_its_first_checkpoint_can_be_started_again(corpus_dir, tmp_path):
    """Its metrics.jsonl (ttt's records only, the last line cut short) is not the user's: a new run
    replaces those records."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "loss": 5.0}\n{"kind": "tra')
    train(small_args(corpus_dir, run, steps=1))
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert lines and all('"kind"' in line for line in lines) and '{"kind": "tra' not in lines


@pytest.mark.parametrize("mixer", ["ttt_linear", "gated_deltanet", "mamba2"])
def test_match_params_sizes_to_the_reference_model_ttt_train_builds(mixer):
    """`--match-params attention` sized the model to plain attention, while `ttt train --mixer attention`
    builds attention with short convolutions: 0.7% more parameters than the models matched to it (tiny).
    TTT-Linear failed first; Gated DeltaNet and Mamba2 fell within the rounding either way (guards)."""
    from ttt.recipes.train import _model_config

    attention = _model_config(TrainArgs(mixer="attention"), 256, None)
    config = _model_config(TrainArgs(mixer=mixer), 256, None)
    assert attention.mixer_kwargs["attention"]["conv_size"] == 4
    slack = 3 * config.dim * config.n_layers * 8 // 2  # half a rounding step of the SwiGLU width
    assert abs(config.num_params() - attention.num_params()) <= slack, (
        config.num_params(),
        attention.num_params(),
    )


def _cli_train(corpus_dir: str, run: Path, *extra: str) -> list[str]:
    """`ttt train` of the micro preset into ``run`` (add --steps, --resume, ...)."""
    return ["train", "--preset", "micro", "--corpus", corpus_dir, "--context", "24", "--batch-size", "4",
            "--eval-batches", "1", "--threads", "1", "--no-plot", "--no-progress", "--log-every", "0",
            "--eval-every", "0", "--out", str(run), *extra]  # fmt: skip


def test_the_parser_tells_which_options_were_given_even_at_their_default():
    """--resume told a given option from one left out by comparing it with its default: `--steps 600` (the
    default) did not extend a run, `--lr 3e-3` (the default) against a run of --lr 1e-3 was ignored."""
    from ttt.cli.main import build_parser
    from ttt.recipes.args import dataclass_from_namespace

    ns = build_parser().parse(["train", "--out", "r", "--resume", "--steps", "600", "--lr", "3e-3", "--plot"])
    args = dataclass_from_namespace(TrainArgs, ns)
    assert args.given == {"out", "resume", "steps", "lr", "plot"} and args.steps == 600
    assert dataclass_from_namespace(TrainArgs, build_parser().parse(["train"])).given == frozenset()


def test_resume_refuses_or_takes_an_option_typed_at_its_default(corpus_dir, tmp_path, capsys):
    from ttt.cli.main import main
    from ttt.recipes.train import resume_args

    run = tmp_path / "r"
    assert main(_cli_train(corpus_dir, run, "--steps", "2", "--lr", "1e-3")) == 0
    capsys.readouterr()
    # --lr 3e-3 is the default, typed: refused as any other value than the checkpoint's
    assert (
        main(["train", "--out", str(run), "--resume", "--lr", "3e-3", "--steps", "3", "--threads", "1"]) == 1
    )
    assert "--lr 0.001 -> 0.003" in capsys.readouterr().err
    assert find_checkpoint(run).name == "step-000002"
    # --steps 600 (the default) typed extends the run to 600
    _, meta, _ = load_checkpoint(run)
    stored = meta["args"]
    assert resume_args(stored, TrainArgs(steps=600, given=frozenset({"steps"}))).steps == 600
    assert resume_args(stored, TrainArgs(steps=600)).steps == 2  # Python API: a default is "not given"
    with pytest.raises(CheckpointError, match="--lr 0.001 -> 0.003"):
        resume_args(stored, TrainArgs(lr=3e-3, given=frozenset({"lr"})))
    with pytest.raises(ValueError, match="given names no argument"):
        train(small_args(corpus_dir, run, resume=True, given=frozenset({"learning_rate"})))


def test_extending_a_run_never_puts_the_lr_back_into_warm_up(corpus_dir, tmp_path):
    """The warm-up (a fraction of --steps) was recomputed from the new --steps of a --resume: 6 steps with
    --warmup 0.5 extended to 20 warmed up again to step 10 (lr 2.25e-3, 7.6e-4, 2.1e-3, 2.4e-3, ...). The
    warm-up keeps the length it had when the run started; the cosine decay is stretched to the new end."""
    import json

    from ttt.recipes.loop import cosine_lr

    run = tmp_path / "r"
    kw = dict(warmup=0.5, eval_every=0, ckpt_every=0)
    train(small_args(corpus_dir, run, steps=6, **kw))
    train(small_args(corpus_dir, run, steps=20, resume=True, **kw))
    train(small_args(corpus_dir, run, steps=30, resume=True, **kw))  # a second extension: still 3 steps
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in records if r["kind"] == "train"]
    assert len(lrs) == 30 and lrs[:3] == pytest.approx([1e-3, 2e-3, 3e-3])
    for start, end in ((3, 6), (6, 20), (20, 30)):  # each part decays from where it starts
        part = lrs[start:end]
        assert all(a >= b for a, b in zip(part, part[1:])), (start, part)
    expected = [cosine_lr(s, peak=3e-3, total=30, warmup=3, final=1e-5) for s in range(20, 30)]
    assert lrs[20:] == pytest.approx(expected)
    _, meta, _ = load_checkpoint(run)
    assert meta["warmup_steps"] == 3 and meta["args"]["warmup"] == 0.5


def test_overwrite_deletes_nothing_when_the_model_cannot_be_built(corpus_dir, tmp_path, monkeypatch):
    """--overwrite deleted the previous run before the model was built: a model that failed to build (or
    to take the optimizer) left the run directory empty. Everything that can fail from the arguments is
    now done first."""
    import ttt.models
    import ttt.recipes.train as recipe

    run = tmp_path / "ow"
    train(small_args(corpus_dir, run, steps=2, ckpt_every=0, eval_every=0))
    before = sorted(p.name for p in run.iterdir())

    class Unbuildable(ttt.models.CausalLM):
        def __init__(self, config):
            raise ValueError("this model cannot be built")

    monkeypatch.setattr(ttt.models, "CausalLM", Unbuildable)
    with pytest.raises(ValueError, match="cannot be built"):
        train(small_args(corpus_dir, run, steps=2, overwrite=True))
    monkeypatch.undo()
    monkeypatch.setattr(recipe, "build_optimizer", lambda model, args: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        train(small_args(corpus_dir, run, steps=2, overwrite=True))
    assert sorted(p.name for p in run.iterdir()) == before and find_checkpoint(run).name == "step-000002"


def test_a_run_directory_in_the_corpus_directory_is_refused_before_anything_is_written(corpus_dir, tmp_path):
    """`--corpus cdir --out cdir/run` trained once; then the corpus held a ttt run, and --resume and
    --overwrite failed on it. It is refused at the start, naming both; a run moved there is refused too."""
    import shutil

    corpus, docs = Path(corpus_dir), sorted(p.name for p in Path(corpus_dir).iterdir())
    for out in (corpus / "run", corpus, corpus / "a" / "b", tmp_path / "link" / "run"):
        if out.parent.name == "link":
            (tmp_path / "link").symlink_to(corpus)  # the same directory by another path
        with pytest.raises(ValueError, match=r"--out .* is (inside|the) --corpus directory .*corpus"):
            train(small_args(corpus_dir, out))
        assert sorted(p.name for p in corpus.iterdir()) == docs
    run = tmp_path / "run"
    train(small_args(corpus_dir, run, steps=1, eval_every=0, ckpt_every=0))
    shutil.move(run, corpus / "run")
    with pytest.raises(ValueError, match=rf"--out {corpus / 'run'} is inside --corpus directory"):
        train(TrainArgs(out=str(corpus / "run"), resume=True, steps=2, progress=False, plot=False))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"batch_size": 10**20}, r"--batch-size must be at most 2,147,483,647 \(2\*\*31 - 1\), got 1000"),
        ({"steps": 10**20}, r"--steps must be at most 2,147,483,647"),
        ({"context": 2**40}, r"--context must be at most 2,147,483,647"),
        ({"eval_batches": 2**31}, r"--eval-batches must be at most 2,147,483,647"),
        ({"context_parallel": 2**63}, r"--context-parallel must be at most 2,147,483,647"),
        (
            {"batch_size": 2**27},
            r"--batch-size x --context is 3,221,225,472 tokens per step; expected at most",
        ),
        ({"tokenizer": "bpe", "vocab_size": 10**20}, r"--vocab-size must be in \[257, 4,194,304\] for --tok"),
        ({"tokenizer": "bpe", "vocab_size": 100}, r"--vocab-size must be in \[257, 4,194,304\] for --tok"),
    ],
)
def test_sizes_beyond_any_machine_are_refused_in_one_line(corpus_dir, tmp_path, change, message):
    """--batch-size 99999999999999999999 ended in a C++ stack dump, --vocab-size of that size (BPE) in an
    OverflowError traceback; --steps of that size trained on and on."""
    with pytest.raises(ValueError, match=message):
        train(small_args(corpus_dir, tmp_path / "x", **change))
    assert not (tmp_path / "x").exists()


def test_a_resume_with_nothing_to_train_says_so_and_claims_no_checkpoint(corpus_dir, tmp_path, capsys):
    """A --resume of a run already at --steps printed 'training to step 3' and 'wrote .../step-000003
    (latest)', though it trained nothing and wrote no checkpoint."""
    run = tmp_path / "r"
    train(small_args(corpus_dir, run, steps=3))
    before = (find_checkpoint(run) / "checkpoint.json").read_bytes()
    capsys.readouterr()
    assert train(small_args(corpus_dir, run, steps=3, resume=True)).step == 3
    out = capsys.readouterr().out
    assert f"resumed from step 3 of {run}: nothing to train (the run is at --steps 3" in out, out
    assert "training to step" not in out and "(latest)" not in out and f"wrote result.json in {run}" in out
    assert (find_checkpoint(run) / "checkpoint.json").read_bytes() == before


def test_overwrite_removes_the_temporaries_a_killed_run_left(corpus_dir, tmp_path):
    """RUN_OUTPUTS named 'loss_curve.png.tmp.png', a name nothing writes, while the plot, result.json and a
    resumed metrics.jsonl are written into '.NAME.*' temporaries: those a killed run left stayed forever."""
    run = tmp_path / "run"
    train(small_args(corpus_dir, run, steps=1, ckpt_every=0, eval_every=0))
    left = [".loss_curve.png.k3j_x9.png", ".result.json.abc123", ".metrics.jsonl.zz9_1q"]
    for name in left:
        (run / name).write_text("cut short")
    train(small_args(corpus_dir, run, steps=1, ckpt_every=0, eval_every=0, overwrite=True))
    assert not [name for name in left if (run / name).exists()]


def test_resume_refuses_a_corpus_whose_text_changed(corpus_dir, tmp_path):
    """A resume on edited text went unnoticed: the run went on training on other data (stranger review)."""
    from ttt.models.checkpoint import CheckpointError

    out = tmp_path / "run"
    train(small_args(corpus_dir, out, steps=2, eval_every=0))
    doc = Path(corpus_dir) / "doc03.txt"
    doc.write_text(doc.read_text() + "an added line\n")
    with pytest.raises(CheckpointError, match=r"^cannot resume: the text of --corpus .* differs from"):
        train(small_args(corpus_dir, out, steps=3, eval_every=0, resume=True))


def test_skip_spikes_skips_a_spike_and_resumes_exactly(corpus_dir, tmp_path, monkeypatch):
    """--skip-spikes: a step whose gradient norm jumps (its loss x 1000 here) applies nothing and is logged
    as skipped; the window of norms goes with the checkpoints, so a run resumed after the window filled
    skips the same step and ends with the same losses and weights."""
    import json

    import ttt.recipes.train as recipe

    real, seen = recipe.lm_loss, []

    def recording(logits, y):
        seen.append(y.clone())
        return real(logits, y)

    kw = dict(steps=14, ckpt_every=11, eval_every=0, skip_spikes=5.0)
    monkeypatch.setattr(recipe, "lm_loss", recording)
    train(small_args(corpus_dir, tmp_path / "plain", **kw))
    spike_y = seen[11]  # step 12: after the window's 10 norms

    def spiky(logits, y):
        return real(logits, y) * (1000.0 if torch.equal(y, spike_y) else 1.0)

    monkeypatch.setattr(recipe, "lm_loss", spiky)
    straight = train(small_args(corpus_dir, tmp_path / "a", **kw))
    records = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("skipped")] == [12]
    train(small_args(corpus_dir, tmp_path / "b", **kw))
    b = tmp_path / "b"
    (b / "latest").write_text("step-000011\n")  # the interruption: the run continues from step 11
    _, _, trainer = load_checkpoint(b / "step-000011", load_trainer=True)
    assert trainer["loop.grad_norms"].shape == (11,)
    resumed = train(small_args(corpus_dir, b, resume=True, **kw))
    records = [json.loads(line) for line in (b / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("skipped")] == [12]
    assert resumed.history["train"] == straight.history["train"]
    wa, _, _ = load_checkpoint(tmp_path / "a")
    wb, _, _ = load_checkpoint(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    for bad in (0.5, -1.0, float("inf")):
        with pytest.raises(ValueError, match="--skip-spikes"):
            train(small_args(corpus_dir, tmp_path / "c", skip_spikes=bad))
    assert not (tmp_path / "c").exists()


def test_activation_checkpointing_trains_the_same_without_fsdp_and_may_change_on_resume(corpus_dir, tmp_path):
    plain = train(small_args(corpus_dir, tmp_path / "a", steps=4, ckpt_every=2))
    recomputed = train(small_args(corpus_dir, tmp_path / "b", steps=4, activation_checkpointing=True))
    assert recomputed.history["train"] == plain.history["train"]  # the same arithmetic, recomputed
    (tmp_path / "a" / "latest").write_text("step-000002\n")
    resumed = train(small_args(corpus_dir, tmp_path / "a", steps=4, ckpt_every=2, resume=True,
                               activation_checkpointing=True))  # fmt: skip
    assert resumed.history["train"] == plain.history["train"]
