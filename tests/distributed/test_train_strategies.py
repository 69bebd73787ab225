"""`ttt train` on 2 gloo processes: `--strategy fsdp` and `--context-parallel 2` log the training losses of
one process (the per-step loss of the global batch)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from recipes.test_train import small_args  # tests/ is on sys.path (rootdir-relative packages)

from ttt.distributed import spawn
from ttt.recipes.train import train

pytestmark = pytest.mark.filterwarnings("ignore:FSDP2-wrapped module")


# the TTT layer without short convolutions: share_qk has no context-parallel form
OFFICIAL = '{"ttt_linear": {"share_qk": false}}'


def _train(rank: int, world: int, corpus_dir: str, out: str, kw: dict) -> list:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    args = small_args(corpus_dir, Path(out), steps=4, match_params="none", mixer_kwargs=OFFICIAL, **kw)
    return train(args).history["train"]


@pytest.mark.parametrize(
    "kw",
    [pytest.param({"strategy": "fsdp"}, marks=pytest.mark.slow), {"context_parallel": 2}],
    ids=["fsdp", "context_parallel"],
)
def test_two_processes_log_the_losses_of_one(corpus_dir, tmp_path, kw):
    one = small_args(corpus_dir, tmp_path / "one", steps=4, match_params="none", mixer_kwargs=OFFICIAL)
    single = train(one).history["train"]
    two = spawn(_train, 2, corpus_dir, str(tmp_path / "two"), kw, start_method="fork")[0]
    assert [s for s, _ in two] == [1, 2, 3, 4]
    for (_, a), (_, b) in zip(single, two):
        assert abs(a - b) < 1e-5


def test_context_parallel_needs_a_multiple_of_processes(corpus_dir, tmp_path):
    with pytest.raises(ValueError, match="--context 24 must split into --context-parallel 5 parts"):
        train(small_args(corpus_dir, tmp_path / "run", context_parallel=5, mixer_kwargs=OFFICIAL))
    with pytest.raises(ValueError, match="share_qk has no context-parallel form yet"):
        train(small_args(corpus_dir, tmp_path / "run", context_parallel=2))


@pytest.mark.slow
def test_torchrun_context_parallel_exits(corpus_dir, tmp_path):
    """Under torchrun the run must also exit: it once hung in the gloo group's destructor at the end."""
    run = tmp_path / "cp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "ttt.cli.main",
           "train", "--context-parallel", "2", "--preset", "micro", "--corpus", corpus_dir, "--steps", "2",
           "--batch-size", "4", "--context", "32", "--eval-every", "2", "--eval-batches", "1", "--threads", "1",
           "--out", str(run), "--no-progress", "--no-plot", "--mixer-kwargs", OFFICIAL]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "2 process(es)" in r.stdout and (run / "result.json").exists()


def test_fsdp_runs_in_one_process_and_context_parallel_asks_for_processes(corpus_dir, tmp_path):
    """The same `--strategy fsdp` command runs without torchrun (a one-process group) and logs the plain
    run's losses; `--context-parallel R` without R processes is one clear error, before anything is written."""
    plain = train(small_args(corpus_dir, tmp_path / "plain", steps=2, match_params="none")).history["train"]
    fsdp = small_args(corpus_dir, tmp_path / "fsdp", steps=2, match_params="none", strategy="fsdp")
    for (_, a), (_, b) in zip(plain, train(fsdp).history["train"]):
        assert abs(a - b) < 1e-5
    with pytest.raises(ValueError, match="launch with torchrun --nproc_per_node 2"):
        train(small_args(corpus_dir, tmp_path / "cp", context_parallel=2, mixer_kwargs=OFFICIAL))
    assert not (tmp_path / "cp").exists()
