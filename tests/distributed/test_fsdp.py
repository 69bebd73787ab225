"""FSDP2 sharded training on gloo (CPU): 2 processes equal 1, resume equals uninterrupted (also on
another number of processes), and a rank killed mid-run leaves the last checkpoint loadable."""

from __future__ import annotations

import pytest
import torch
from torch.multiprocessing import ProcessExitedException

from ttt.distributed import spawn
from ttt.distributed.fsdp import latest_sharded

from . import fsdp_cases as F

pytestmark = pytest.mark.filterwarnings("ignore:FSDP2-wrapped module")


def _run(rank: int, world: int, kwargs: dict) -> dict:
    return F.train(rank, world, **kwargs)


def _close_weights(a: dict, b: dict, tol: float) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=tol, atol=tol, msg=k)


@pytest.fixture(scope="module")
def plain():
    return F.train(0, 1, sharded=False)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp") / "dcp"
    out = spawn(_run, 2, {"root": str(root), "ckpt_every": 3, "checkpoint_blocks": True}, start_method="fork")
    return root, out[0]


def test_two_processes_equal_one(plain, sharded):
    _, run = sharded
    # float32 over 6 AdamW steps: the sharded reductions sum in another order
    torch.testing.assert_close(
        torch.tensor(run["losses"]), torch.tensor(plain["losses"]), rtol=1e-5, atol=1e-5
    )
    _close_weights(run["state"], plain["state"], 1e-4)


def test_resume_equals_uninterrupted_on_other_world_size(sharded):
    root, run = sharded
    out = spawn(_run, 1, {"root": str(root), "resume_from": str(root / "step-0000003")}, start_method="fork")[
        0
    ]
    assert out["start"] == 3
    torch.testing.assert_close(
        torch.tensor(out["losses"]), torch.tensor(run["losses"][3:]), rtol=1e-5, atol=1e-5
    )
    _close_weights(out["state"], run["state"], 1e-5)


@pytest.mark.slow
def test_killed_rank_leaves_last_checkpoint_loadable(sharded, tmp_path):
    _, run = sharded
    root = tmp_path / "dcp"
    with pytest.raises(ProcessExitedException):
        spawn(_run, 2, {"root": str(root), "ckpt_every": 2, "kill_after": 5}, start_method="fork")
    (root / "step-0000006").mkdir()  # a save cut short: no completion marker, never picked
    assert latest_sharded(root).name == "step-0000004"
    out = spawn(_run, 2, {"root": str(root), "resume_from": "latest"}, start_method="fork")[0]
    assert out["start"] == 4
    _close_weights(out["state"], run["state"], 1e-4)


def test_mixed_precision_trains(plain):
    out = spawn(_run, 2, {"mixed_precision": True}, start_method="fork")[0]
    assert all(torch.isfinite(torch.tensor(out["losses"])))
    # bfloat16 compute: the first loss (same weights) agrees to bfloat16 precision
    assert abs(out["losses"][0] - plain["losses"][0]) < 0.05


def test_train_names_bad_strategy():
    from ttt.recipes.args import TrainArgs
    from ttt.recipes.train import _check_args

    with pytest.raises(ValueError, match="strategy must be 'ddp' or 'fsdp'"):
        _check_args(TrainArgs(strategy="zero3"))
    with pytest.raises(ValueError, match="--activation-checkpointing with --context-parallel is not built"):
        no_conv = '{"ttt_linear": {"share_qk": false}}'
        _check_args(TrainArgs(activation_checkpointing=True, context_parallel=2, mixer_kwargs=no_conv))


def test_every_rank_refuses_a_corrupt_shard_naming_it(sharded, tmp_path):
    """The sha256 of each file is recorded in the marker when the shards are saved and checked (each rank
    its share of the files) before any is loaded: every rank raises the same one-line error."""
    import json
    import shutil

    root, _ = sharded
    step = tmp_path / "step-0000003"
    shutil.copytree(root / "step-0000003", step)
    assert sorted(json.loads((step / ".complete").read_text())["sha256"]) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp"
    ]  # fmt: skip
    shard = step / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(Exception, match=rf"{shard} does not match its sha256") as e:
        spawn(_run, 2, {"root": str(tmp_path), "resume_from": str(step)}, start_method="fork")
    assert "CheckpointError" in str(e.value)
    assert not list(root.glob(".tmp-step-*"))  # the saves left no temporaries
