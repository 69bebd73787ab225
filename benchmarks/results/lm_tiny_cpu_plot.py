"""Validation curves (bits per byte vs step) of several `ttt train` runs in one PNG.

python benchmarks/results/lm_tiny_cpu_plot.py RUNS_DIR ttt_linear ttt_mlp gated_deltanet attention
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(runs: str, mixers: list[str]) -> None:
    fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(11, 4), dpi=120)
    for m in mixers:
        run = Path(runs) / m
        meta = json.loads((run / (run / "latest").read_text().strip() / "checkpoint.json").read_text())
        steps, losses = zip(*meta["history"]["train"])
        # bytes tokenizer: nats per token / ln 2 = bits per byte; moving average over 25 steps
        smooth = [sum(losses[max(0, i - 24) : i + 1]) / len(losses[max(0, i - 24) : i + 1]) / math.log(2)
                  for i in range(len(losses))]  # fmt: skip
        ax_train.plot(steps, smooth, label=m)
        vsteps, bpb = zip(*[(v[0], v[2]) for v in meta["history"]["val"]])
        ax_val.plot(vsteps, bpb, marker="o", label=f"{m} ({bpb[-1]:.3f})")
    ax_train.set(xlabel="step (16 x 128 bytes)", ylabel="train bits per byte (25-step mean)", ylim=(2.0, 5.0))
    ax_val.set(xlabel="step", ylabel="validation bits per byte (held-out plays)")
    for ax in (ax_train, ax_val):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("ttt train, tiny preset, Shakespeare, equal parameters and steps, 2 CPU threads")
    fig.tight_layout()
    out = Path(__file__).with_name("lm_tiny_cpu.png")
    fig.savefig(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
