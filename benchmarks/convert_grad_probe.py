"""Which weights make the gradient spikes of a ``ttt convert`` distillation? From one checkpoint of the run,
takes the batches its next steps draw (its sampler state), and splits each window's gradient of the
distillation loss (the run's --dtype and --ce-weight; the weights as saved, no optimizer step) into groups:
each converted mixer's tensors, each block's norms and MLP, the embedding.

    python benchmarks/convert_grad_probe.py RUN/step-000120 --steps 6 --threads 1 \
        --out benchmarks/results/convert_grad_probe_gdn_s2

Prints (and with ``--out`` writes OUT.md and OUT.json) every window's loss, gradient norm and largest
groups, and, over the spike windows (norm above ``--spike`` times the median window's), each group's share
of their squared norm. One window at a time: a 4-window SmolLM2 step's activations would double the memory.
"""

from __future__ import annotations

import collections
import os
import re
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))

from _harness import finish_report, load_conversion  # noqa: E402

from ttt.recipes.args import Parser  # noqa: E402


def group_of(name: str) -> str:
    """``blocks.1.mixer.g_proj.weight`` -> ``1 mixer.g_proj``; ``blocks.0.mlp.up_proj.weight`` -> ``0 mlp``;
    ``blocks.0.mixer_norm.weight`` -> ``0 norms``; others by their first name (``embed``, ``norm``, ...)."""
    m = re.match(r"blocks\.(\d+)\.([^.]+)\.?([^.]*)", name)
    if not m:
        return name.split(".")[0]
    block, part, tensor = m.groups()
    if part == "mixer":
        return f"{block} mixer.{tensor}"
    return f"{block} {'mlp' if part == 'mlp' else 'norms'}"


def grad_split(checkpoint: Path, steps: int) -> list[dict]:
    """``[{"step", "window", "loss", "norm", "groups": {group: norm}}]`` for each window of the next
    ``steps`` distillation batches after ``checkpoint``."""
    from ttt.data import sample_batch
    from ttt.models.checkpoint import load_checkpoint
    from ttt.recipes.common import autocast
    from ttt.recipes.convert import distill_loss

    student, teacher, meta, train = load_conversion(checkpoint)
    args, step = meta["args"], int(meta["step"])
    if step < args["transfer_steps"]:  # its next steps are attention transfer's, not distillation's
        raise SystemExit(f"{checkpoint} is a checkpoint within attention transfer (step {step}): give one at "
                         f"or after step {args['transfer_steps']}")  # fmt: skip
    sampler = torch.Generator().manual_seed(args["seed"] + 1)  # distillation's, as ttt convert draws it
    if step > args["transfer_steps"]:  # within distillation: where the run's sampler stood
        sampler.set_state(load_checkpoint(checkpoint, load_trainer=True)[2]["rng.sampler"])
    student.train()
    rows = []
    for s in range(step + 1, step + steps + 1):
        x, y = sample_batch(train, args["batch_size"], args["context"], sampler)
        for w in range(x.shape[0]):
            student.zero_grad(set_to_none=True)
            with autocast(torch.device("cpu"), args.get("dtype", "float32")):
                loss = distill_loss(student, teacher, x[w : w + 1], y[w : w + 1], args.get("ce_weight", 0.0))
            loss.backward()
            sq: dict[str, float] = collections.Counter()
            for n, p in student.named_parameters():
                if p.grad is not None:
                    sq[group_of(n)] += float(p.grad.double().pow(2).sum())
            rows.append({"step": s, "window": w, "loss": float(loss.detach()), "norm": sum(sq.values()) ** 0.5,
                         "groups": {k: v**0.5 for k, v in sorted(sq.items(), key=lambda kv: -kv[1])}})  # fmt: skip
    return rows


def spike_shares(rows: list[dict], spike: float) -> tuple[float, list[dict], list[tuple[str, float]]]:
    """The median window norm, the spike windows (norm > ``spike`` x it) and each group's share of their
    summed squared norm, largest first."""
    median = statistics.median(r["norm"] for r in rows)
    spikes = [r for r in rows if r["norm"] > spike * median]
    total: dict[str, float] = collections.Counter()
    for r in spikes:
        for k, v in r["groups"].items():
            total[k] += v * v
    whole = sum(total.values()) or 1.0
    return median, spikes, [(k, v / whole) for k, v in sorted(total.items(), key=lambda kv: -kv[1])]


def main(argv: list[str] | None = None) -> None:
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path, help="a checkpoint directory of a ttt convert run (RUN/step-N)")
    p.add_argument(
        "--steps", type=int, default=4, help="distillation batches after the checkpoint (default: 4)"
    )
    p.add_argument(
        "--spike", type=float, default=5.0, help="a spike window's norm over the median's (default: 5)"
    )
    p.add_argument("--top", type=int, default=4, help="groups named per window (default: 4)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, help="write OUT.md and OUT.json (default: print only)")
    a = p.parse(argv)
    for flag, value in (("--steps", a.steps), ("--top", a.top), ("--threads", a.threads)):
        if value < 1:
            raise SystemExit(f"{flag} must be >= 1, got {value}")
    if not a.spike > 1:
        raise SystemExit(f"--spike must be > 1, got {a.spike}")
    torch.set_num_threads(a.threads)
    rows = grad_split(a.checkpoint, a.steps)
    median, spikes, shares = spike_shares(rows, a.spike)
    lines = [f"Distillation gradient of `{a.checkpoint}`, window by window, on the batches of its next "
             f"{a.steps} steps (weights as saved).", "",
             "| step | window | loss | gradient norm | largest groups |", "|---|---|---|---|---|"]  # fmt: skip
    lines += [f"| {r['step']} | {r['window']} | {r['loss']:.3f} | {r['norm']:.1f} | "
              + ", ".join(f"{k} {v:.1f}" for k, v in list(r["groups"].items())[: a.top]) + " |" for r in rows]  # fmt: skip
    lines += ["", f"Median window norm {median:.2f}; {len(spikes)} of {len(rows)} windows above {a.spike:g}x it. "
              "Each group's share of their summed squared norm:", "", "| group | share |", "|---|---|"]  # fmt: skip
    lines += [f"| {k} | {v:.3f} |" for k, v in shares[:12]]
    payload = {"rows": rows, "median_norm": median, "spike": a.spike, "shares": dict(shares)}
    finish_report("convert_grad_probe.py", lines, payload, argv, a.out)


if __name__ == "__main__":
    main()
