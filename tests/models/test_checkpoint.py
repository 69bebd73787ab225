"""Checkpoints: save -> load gives the same logits; bad files give clear errors and change nothing."""

from __future__ import annotations

import pytest
import torch

from ttt.models import CausalLM, LMConfig
from ttt.models.checkpoint import (
    CheckpointError,
    clear_run,
    find_checkpoint,
    load_checkpoint,
    load_model,
    save_checkpoint,
    update_checkpoint_meta,
)


def saved_model(tmp_path, mixer="ttt_linear"):
    torch.manual_seed(0)
    config = LMConfig.from_name("micro", mixer=mixer, vocab_size=50)
    model = CausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    save_checkpoint(tmp_path, step=7, model_state=model.state_dict(), config=config, meta={"note": "x"})
    return model, config


@pytest.mark.parametrize("mixer", ["ttt_linear", "attention"])
def test_save_load_same_logits(tmp_path, mixer):
    model, config = saved_model(tmp_path, mixer)
    loaded, meta = load_model(tmp_path, expect=config)
    idx = torch.randint(0, 50, (2, 33))
    with torch.no_grad():
        assert torch.equal(model(idx)[0], loaded.eval()(idx)[0])
    assert meta["step"] == 7 and meta["note"] == "x"
    assert loaded.head.weight is loaded.embed.weight


def test_latest_points_at_newest_and_old_ones_are_pruned(tmp_path):
    model, config = saved_model(tmp_path)
    for step in (8, 9, 10):
        save_checkpoint(tmp_path, step=step, model_state=model.state_dict(), config=config, keep=2)
    assert find_checkpoint(tmp_path).name == "step-000010"
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-000009", "step-000010"]


def test_pruning_keeps_the_new_checkpoint_and_never_touches_higher_steps(tmp_path):
    model, config = saved_model(tmp_path)
    state = model.state_dict()
    # left by an older run (or a run resumed from an older checkpoint): higher steps than the new ones
    for step in (20, 1_000_000):
        save_checkpoint(tmp_path, step=step, model_state=state, config=config)
    for step in (2, 4, 6):
        save_checkpoint(tmp_path, step=step, model_state=state, config=config, keep=2)
    names = sorted(p.name for p in tmp_path.glob("step-*"))
    assert names == ["step-000004", "step-000006", "step-000020", "step-1000000"]
    assert find_checkpoint(tmp_path).name == "step-000006"


def test_update_meta_and_clear_run(tmp_path):
    model, config = saved_model(tmp_path)
    update_checkpoint_meta(find_checkpoint(tmp_path), note="y")
    assert load_checkpoint(tmp_path)[1]["note"] == "y"
    with pytest.raises(ValueError, match="step"):
        update_checkpoint_meta(find_checkpoint(tmp_path), step=3)
    (tmp_path / "plot.png").write_bytes(b"x")
    (tmp_path / "mine.txt").write_text("x")
    (find_checkpoint(tmp_path) / "mine.txt").write_text("x")
    with pytest.raises(CheckpointError, match="mine.txt"):
        clear_run(tmp_path, ("*.png",))
    assert find_checkpoint(tmp_path).name == "step-000007" and (tmp_path / "plot.png").exists()
    (find_checkpoint(tmp_path) / "mine.txt").unlink()
    removed = clear_run(tmp_path, ("*.png",))
    assert [p.name for p in removed] == ["latest", "step-000007", "plot.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]
    # no checkpoint left: the directory is no run, and files named like ttt's outputs are the user's
    (tmp_path / "eval.json").write_text("{}")
    assert clear_run(tmp_path, ("*.png", "eval.json")) == [] and (tmp_path / "eval.json").exists()


def test_corrupted_or_truncated_checkpoint_is_refused(tmp_path):
    saved_model(tmp_path)
    f = find_checkpoint(tmp_path) / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        load_model(tmp_path)
    f.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        load_model(tmp_path)
    (find_checkpoint(tmp_path) / "checkpoint.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupted"):
        load_model(tmp_path)


def test_checkpoint_from_another_config_is_refused(tmp_path):
    saved_model(tmp_path)
    other = LMConfig.from_name("micro", mixer="attention", vocab_size=50)
    with pytest.raises(CheckpointError, match="mixer"):
        load_model(tmp_path, expect=other)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        find_checkpoint(tmp_path / "nope")
