"""How long one training step of ``ttt convert`` takes in float32 and under ``--dtype bfloat16``, side by
side on one machine: the forward and backward of each stage's loss on the same batch, from one checkpoint
of a conversion (its student, teacher, blocks, context and batch size; no optimizer step, so every repeat
sees the same weights). The modes alternate, so a slower minute of a shared machine falls on both.

    python benchmarks/convert_step_time.py RUN/step-000040 --repeats 5 --threads 2 \
        --out benchmarks/results/convert_step_time_gdn

Prints (and with ``--out`` writes OUT.md and OUT.json) the median seconds a step of each stage and mode,
their ratio, and each mode's loss on the batch; and the same for one matmul of the blocks' largest
projection on the batch's tokens (what bfloat16 gains where nothing else runs).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))

from _harness import finish_report, load_conversion  # noqa: E402

from ttt.recipes.args import Parser  # noqa: E402

MODES = ("float32", "bfloat16")


def step_times(checkpoint: Path, repeats: int, seed: int = 0) -> list[dict]:
    """``[{"stage", "dtype", "seconds": [...], "median_s", "loss"}]`` for stages transfer and distill, and
    for one matmul of the blocks' largest projection on the batch's tokens (its "loss": the sum)."""
    from ttt.data import sample_batch
    from ttt.recipes.common import autocast
    from ttt.recipes.convert import distill_loss, transfer_loss

    student, teacher, meta, train = load_conversion(checkpoint)
    args, summary = meta["args"], meta["summary"]
    student.train()
    x, y = sample_batch(train, args["batch_size"], args["context"], torch.Generator().manual_seed(seed))
    device, blocks = torch.device("cpu"), summary["blocks"]
    losses = {
        "transfer": lambda: transfer_loss(student, teacher, blocks, x),
        "distill": lambda: distill_loss(student, teacher, x, y, args.get("ce_weight", 0.0)),
    }
    # the blocks' largest projection on the batch's tokens: what the matrix units alone gain
    weight = max(
        (m.weight for m in student.blocks.modules() if isinstance(m, torch.nn.Linear)), key=torch.numel
    )
    tokens = torch.randn(x.numel(), weight.shape[1])
    losses["matmul"] = lambda: (tokens @ weight.detach().T).float().sum().requires_grad_()
    rows = []
    for stage, loss_fn in losses.items():
        seconds: dict[str, list[float]] = {m: [] for m in MODES}
        loss: dict[str, float] = {}
        for i in range(repeats + 1):  # the first round warms up and is not counted
            for mode in MODES:
                t = time.perf_counter()
                with autocast(device, mode):
                    value = loss_fn()
                value.backward()
                student.zero_grad(set_to_none=True)
                if i:
                    seconds[mode].append(time.perf_counter() - t)
                loss[mode] = float(value.detach())
        rows += [{"stage": stage, "dtype": m, "seconds": seconds[m], "median_s": statistics.median(seconds[m]),
                  "loss": loss[m]} for m in MODES]  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> None:
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path, help="a checkpoint directory of a ttt convert run (RUN/step-N)")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per stage and mode (default: 5)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, help="write OUT.md and OUT.json (default: print only)")
    a = p.parse(argv)
    for flag, value in (("--repeats", a.repeats), ("--threads", a.threads)):
        if value < 1:
            raise SystemExit(f"{flag} must be >= 1, got {value}")
    torch.set_num_threads(a.threads)
    rows = step_times(a.checkpoint, a.repeats)
    lines = [f"One training step of `{a.checkpoint}` ({a.threads} threads, median of {a.repeats}; forward "
             "and backward, no optimizer step).", "",
             "| stage | --dtype | median s a step | x float32's time | loss on the batch |",
             "|---|---|---|---|---|"]  # fmt: skip
    base = {r["stage"]: r["median_s"] for r in rows if r["dtype"] == "float32"}
    lines += [f"| {r['stage']} | {r['dtype']} | {r['median_s']:.3f} | {r['median_s'] / base[r['stage']]:.2f} | "
              f"{r['loss']:.4f} |" for r in rows]  # fmt: skip
    finish_report("convert_step_time.py", lines, {"rows": rows}, argv, a.out)


if __name__ == "__main__":
    main()
