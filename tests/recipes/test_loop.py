"""The recipes' one training loop (:mod:`ttt.recipes.loop`): the lr schedule, its per-group multiples, and
spike skipping."""

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


def _spiky_loop(skip_spikes: float, spikes: set[int], steps: int, **kw) -> TrainLoop:
    """A linear model whose loss gradient has norm 2, and 2000 on the ``spikes`` steps (0-based)."""
    torch.manual_seed(0)
    model = nn.Linear(4, 1, bias=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return TrainLoop(model, opt, lambda s: 1000.0 if s in spikes else 1.0,
                     lambda scale: scale * model(torch.ones(1, 4)).sum(), steps=steps, lr=lambda s: 1e-2,
                     skip_spikes=skip_spikes, **kw)  # fmt: skip


def test_skip_spikes_applies_nothing_of_a_spike_and_logs_it(tmp_path):
    """A step whose gradient norm is over ``skip_spikes`` x the median of the latest ones leaves the weights
    and AdamW's moments as they were, and its record says so; without the option the same step is taken."""
    import json

    from ttt.recipes.loop import MetricsLog

    loop = _spiky_loop(10.0, {12}, 12, log=MetricsLog(tmp_path, total=13, progress=False))
    loop.run()
    weight = loop.model.weight.detach().clone()
    moments = {k: v.clone() for k, v in loop.optimizer.state[loop.model.weight].items()}
    loop.steps = 13
    loop.run(start=12)
    loop.log.close()
    assert loop.skipped == [13] and torch.equal(loop.model.weight, weight)
    assert all(torch.equal(v, moments[k]) for k, v in loop.optimizer.state[loop.model.weight].items())
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("skipped", 0) for r in records] == [0] * 12 + [1]
    assert records[-1]["grad_norm"] == pytest.approx(2000.0, rel=1e-5)
    plain = _spiky_loop(0.0, {12}, 13)
    plain.run()
    assert plain.skipped == [] and not torch.equal(plain.model.weight, weight)


def test_skip_spikes_waits_for_its_window_and_accepts_a_lasting_rise():
    """No skip before SPIKE_MIN_WINDOW norms are seen; a rise that lasts is a spike only until it is half
    of the window (the median counts the skipped norms too)."""
    from ttt.recipes.loop import SPIKE_MIN_WINDOW, SPIKE_WINDOW

    early = _spiky_loop(10.0, {SPIKE_MIN_WINDOW - 1}, SPIKE_MIN_WINDOW)
    early.run()
    assert early.skipped == []
    rise = set(range(SPIKE_WINDOW, 3 * SPIKE_WINDOW))
    loop = _spiky_loop(10.0, rise, 3 * SPIKE_WINDOW)
    loop.run()
    assert loop.skipped == list(range(SPIKE_WINDOW + 1, SPIKE_WINDOW + SPIKE_WINDOW // 2 + 1))
    assert len(loop.norms) == SPIKE_WINDOW


def test_skip_spikes_resumes_exactly_from_its_saved_window():
    """Steps 1..30 in one loop equal steps 1..15 then 16..30 in a new loop given the first one's norms (a
    recipe saves them with its checkpoints), spikes skipped on both sides of the split."""
    spikes = {13, 17, 26}
    whole = _spiky_loop(10.0, spikes, 30)
    whole.run()
    first = _spiky_loop(10.0, spikes, 15)
    first.run()
    second = TrainLoop(first.model, first.optimizer, first.batch, first.loss, steps=30, lr=first.lr,
                       skip_spikes=10.0, norms=list(first.norms), skipped=list(first.skipped))  # fmt: skip
    second.run(start=15)
    assert whole.skipped == second.skipped == [14, 18, 27]
    assert torch.equal(whole.model.weight, second.model.weight)
