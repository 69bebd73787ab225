"""The recipes' one training loop (:mod:`ttt.recipes.loop`): the lr schedule and its per-group multiples."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ttt.recipes.loop import TrainLoop, cosine_lr


def test_cosine_lr_is_torchs_cosine_annealing_after_the_warmup():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20, eta_min=0.03)
    for step in range(21):
        assert cosine_lr(step, peak=0.3, total=20, final=0.03) == pytest.approx(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert cosine_lr(0, peak=0.3, total=20, warmup=4) == pytest.approx(0.3 / 4)


def test_a_param_group_with_lr_scale_follows_the_schedule_times_its_scale():
    model = nn.Linear(3, 2)
    opt = torch.optim.AdamW([{"params": [model.weight]}, {"params": [model.bias], "lr_scale": 0.1}], lr=1.0)
    seen = []

    def loss(batch):
        seen.append([g["lr"] for g in opt.param_groups])
        return model(batch).pow(2).sum()

    TrainLoop(model, opt, lambda s: torch.ones(4, 3), loss, steps=3, lr=lambda s: 0.5 / (s + 1)).run()
    assert sum(seen, []) == pytest.approx([0.5, 0.05, 0.25, 0.025, 0.5 / 3, 0.05 / 3])


def test_a_resumed_log_replaces_metrics_jsonl_whole_never_rewrites_it_in_place(tmp_path):
    """A resumed run dropped the records after its checkpoint by rewriting metrics.jsonl in place (truncate,
    then write): a run killed meanwhile lost the whole log. A temporary is now renamed over it, so a reader
    of the old file (the file as it was, if the rename never comes) sees all of it."""
    import json

    from ttt.recipes.loop import MetricsLog, StepOutcome

    path = tmp_path / "metrics.jsonl"
    old = "".join(json.dumps({"kind": "train", "step": s, "loss": 1.0}) + "\n" for s in range(1, 6))
    path.write_text(old + '{"kind": "tra')
    with open(path) as reader:
        log = MetricsLog(tmp_path, total=10, start=3, progress=False)
        log.step(4, StepOutcome(0.5, 1.0, 1e-3, 0.1))
        log.close()
        assert reader.read() == old + '{"kind": "tra'
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]
    assert not list(tmp_path.glob(".metrics.jsonl*")) and path.stat().st_mode & 0o777 == 0o644


def test_the_schedule_reaches_its_final_lr_after_the_last_step():
    """As documented (cosine_lr, --min-lr): the value ``final`` is the schedule's at step ``total``, once
    the run is over; the last step (``total - 1``) runs a little above it, as with CosineAnnealingLR."""
    import math

    last = cosine_lr(5, peak=3e-3, total=6, warmup=3, final=1e-5)
    assert last == pytest.approx(1e-5 + (3e-3 - 1e-5) * (1 - math.cos(math.pi / 3)) / 2)
    assert cosine_lr(6, peak=3e-3, total=6, warmup=3, final=1e-5) == pytest.approx(1e-5)
