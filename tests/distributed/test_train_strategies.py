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


def _fsdp(corpus_dir: str, out: Path, **kw) -> object:
    """`ttt train --strategy fsdp` in one process, a checkpoint (and its shards) every step."""
    return small_args(corpus_dir, out, match_params="none", strategy="fsdp", eval_every=0, ckpt_every=1, **kw)


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_a_linked_dcp_is_refused_and_the_shards_it_names_are_untouched(corpus_dir, tmp_path):
    """`dcp` of a run directory may be a link to another run's: a resumed or overwritten run then loaded,
    wrote and pruned the other run's shards."""
    import shutil

    import torch.distributed as dist

    from ttt.models.checkpoint import CheckpointError, find_checkpoint

    other, run = tmp_path / "other", tmp_path / "run"
    train(_fsdp(corpus_dir, other, steps=2))
    train(_fsdp(corpus_dir, run, steps=1))
    before = _tree(other)
    shutil.rmtree(run / "dcp")
    (run / "dcp").symlink_to(other / "dcp")
    for kw in ({"resume": True}, {"overwrite": True}):
        with pytest.raises(CheckpointError, match="dcp is a symbolic link"):
            train(_fsdp(corpus_dir, run, steps=3, **kw))
        assert _tree(other) == before and find_checkpoint(run).name == "step-000001"
        assert not dist.is_initialized()  # a failed run gives back the process group it made


@pytest.mark.parametrize("name", ["__0_0.distcp", ".metadata"])
def test_a_corrupt_shard_is_refused_on_resume_naming_the_file(corpus_dir, tmp_path, name):
    """--resume of an FSDP run reads its weights and moments from dcp/, whose files were not hash-checked:
    a flipped byte in a shard loaded silently."""
    from ttt.models.checkpoint import CheckpointError, find_checkpoint

    run = tmp_path / "run"
    train(_fsdp(corpus_dir, run, steps=2))
    shard = run / "dcp" / "step-0000002" / name
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{shard} does not match its sha256"):
        train(_fsdp(corpus_dir, run, steps=3, resume=True))
    assert find_checkpoint(run).name == "step-000002"


def test_a_sharded_save_cut_short_leaves_no_step_directory(corpus_dir, tmp_path, monkeypatch):
    """Shards are written into a hidden temporary directory and renamed into place once complete: a save
    that fails leaves no step-N directory (and no temporary) behind."""
    import torch.distributed.checkpoint as dcp

    run, real = tmp_path / "run", dcp.save

    def failing(state, *, checkpoint_id):
        real(state, checkpoint_id=checkpoint_id)
        raise OSError("no space left on device")

    train(_fsdp(corpus_dir, run, steps=1))
    monkeypatch.setattr(dcp, "save", failing)
    with pytest.raises(OSError, match="no space left"):
        train(_fsdp(corpus_dir, run, steps=2, resume=True))
    assert sorted(p.name for p in (run / "dcp").iterdir()) == ["step-0000001"]
