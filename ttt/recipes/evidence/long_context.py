"""Long context (the TTT paper's claim): does TTT's loss keep falling with position like attention's and
unlike a fixed-state RNN's, and what happens beyond the training context?

    python -m ttt.recipes.evidence.long_context --lrs 1e-3,3e-3,1e-2     # tune on seed 0, then seeds 1, 2
    python -m ttt.recipes.evidence.long_context --only ttt-linear,attention --seeds 0
    python -m ttt.recipes.evidence.long_context --quick                  # pipeline check, seconds

Every mixer trains the tiny byte-level LM (4 blocks x 128, equal parameters through ``--match-params
attention``) on Shakespeare windows of 2,048 bytes, batch 2 (4,096 bytes a step, the same for every
mixer), then scores 16 validation windows of 8,192 bytes (4x the training context) and 64 of 2,048,
position by position. Reported per mixer: validation bits/byte at 2,048 (mean ± sd over seeds at the
tuned lr), the loss in position bands growing geometrically up to 8,192 (``band_edges``), the in-context
fall (band 1024-2047 minus band 64-255 in the 2,048-byte windows) and the change beyond the training
context (band 4096-8191 minus band 1024-2047).

Mixers (``RunSpec`` labels): ``ttt-linear``, ``ttt-linear-M`` (short convolutions, ``share_qk``),
``ttt-mlp``, ``ttt-mlp-M``, ``attention`` (RoPE), ``swa`` (sliding window 512), ``attention-conv`` and
``swa-conv`` (the same with short convolutions of 4 on q, k, v, as the (M) layers and the family have),
``gated-deltanet``, ``mamba2``.
"""

from __future__ import annotations

import math

from .common import (
    RunSpec,
    Scale,
    at_best_lr,
    base_parser,
    run_experiment,
    scale_from_args,
    table,
)
from .stats import fmt_ms, mean_spread

__all__ = ["SPECS", "main"]

NAME = "long_context"

SPECS = [
    RunSpec("ttt-linear", "ttt_linear"),
    RunSpec("ttt-linear-M", "ttt_linear", {"share_qk": True}),
    RunSpec("ttt-mlp", "ttt_mlp"),
    RunSpec("ttt-mlp-M", "ttt_mlp", {"share_qk": True}),
    RunSpec("attention", "attention"),
    RunSpec("swa", "swa"),
    RunSpec("attention-conv", "attention", {"conv_size": 4}),
    RunSpec("swa-conv", "swa", {"conv_size": 4}),
    RunSpec("gated-deltanet", "gated_deltanet"),
    RunSpec("mamba2", "mamba2"),
]

FULL = Scale(steps=600, batch_size=2, context=2048, eval_contexts=(2048, 8192), eval_tokens=131072,
             eval_batch_tokens=16384)  # fmt: skip


def band_edges(context: int, long: int) -> list[int]:
    """Position bands growing geometrically, so that both the fall over the first positions and the
    stretch beyond the training context show: for context 2,048 and 8,192,
    ``[0, 16, 64, 256, 1024, 2048, 4096, 8192]`` (the last two bands lie past the training context)."""
    inside = [context // 128, context // 32, context // 8, context // 2, context]
    edges, beyond = [0, *sorted({e for e in inside if e > 0})], context * 2
    while beyond <= long:
        edges.append(beyond)
        beyond *= 2
    return edges if edges[-1] == long else [*edges, long]


def band_means(curve: list[float], edges: list[int]) -> list[float]:
    """Mean of ``curve`` over each band ``[edges[k], edges[k + 1])``."""
    return [sum(curve[lo:hi]) / (hi - lo) for lo, hi in zip(edges, edges[1:])]


def summarise(records: list[dict], specs: list[RunSpec], scale: Scale) -> tuple[str, dict, dict]:
    """Markdown, JSON summary and plot of the cached ``records``.

    Per mixer, at its tuned lr and over the seeds: validation bits/byte at the training context, the mean
    loss in geometric position bands of the 4x windows, the change from the band ending at 1/8 of the
    context to the last band inside it (``in-context fall``, in the windows of the training length, which
    are 4x as many: negative when the loss keeps falling) and from the last band inside the context to the
    last band of the 4x windows (``beyond``: positive when the loss rises past the training context)."""
    long = scale.eval_contexts[-1]
    edges = band_edges(scale.context, long)
    inside = edges.index(scale.context) - 1  # the last band inside the training context
    early = max(0, inside - 2)  # the band ending at 1/8 of the context
    # plot bands: 0-7, 8-15, then half octaves (a band of a few positions in 16 windows is mostly noise)
    halves = {int(2 ** (k / 2)) for k in range(8, 2 * int(math.log2(long)) + 1)}
    fine = sorted(e for e in {0, 8, *halves} if e < long) + [long]
    summary, rows, series = {}, [], {}
    for spec in specs:
        runs = at_best_lr(records, spec.label)
        if not runs:
            continue
        bpn = runs[0]["bits_per_nat"]
        curves = [band_means([v * bpn for v in r["by_position"][str(long)]], edges) for r in runs]
        # the fall inside the context from the windows of the training length (4x as many as the long ones)
        short = [band_means([v * bpn for v in r["by_position"][str(scale.context)]], edges[: inside + 2])
                 for r in runs]  # fmt: skip
        fall = [c[inside] - c[early] for c in short]
        beyond = [c[-1] - c[inside] for c in curves]
        mean_curve = [mean_spread([c[k] for c in curves])[0] for k in range(len(edges) - 1)]
        tried = sorted({(r["lr"], round(r["val_bits_per_byte"], 4)) for r in records
                        if r["spec"]["label"] == spec.label and r["seed"] == runs[0]["seed"]})  # fmt: skip
        summary[spec.label] = {
            "spec": runs[0]["spec"],
            "lr": runs[0]["lr"],
            "lr_grid_seed0_bits_per_byte": tried,
            "seeds": [r["seed"] for r in runs],
            "num_params": runs[0]["num_params"],
            "val_bits_per_byte": [r["val_bits_per_byte"] for r in runs],
            "band_edges": edges,
            f"band_bits_per_byte_ctx{long}": curves,
            "in_context_fall": fall,
            "beyond_context_change": beyond,
            "train_seconds": [r["train_seconds"] for r in runs],
        }
        rows.append([f"`{spec.label}`", f"{runs[0]['num_params']:,}", f"{runs[0]['lr']:g}",
                     fmt_ms(summary[spec.label]["val_bits_per_byte"]), *(f"{v:.3f}" for v in mean_curve),
                     fmt_ms(fall).split(" (")[0], fmt_ms(beyond).split(" (")[0],
                     f"{mean_spread(summary[spec.label]['train_seconds'])[0]:.0f}"])  # fmt: skip
        by_pos = [r["by_position"][str(long)] for r in runs]
        mean_by_pos = [sum(c[i] for c in by_pos) / len(by_pos) * bpn for i in range(long)]
        xs = [math.sqrt(max(lo, 1) * hi) for lo, hi in zip(fine, fine[1:])]
        series[spec.label] = (xs, band_means(mean_by_pos, fine))
    bands = [f"{lo}-{hi - 1}{'*' if hi > scale.context else ''}" for lo, hi in zip(edges, edges[1:])]
    md = "\n\n".join([
        "# Loss by position, trained at a long context",
        f"Scale: preset `{scale.preset}`, {scale.steps} steps of {scale.batch_size} x {scale.context} bytes, "
        f"{scale.threads} thread(s); {scale.eval_tokens:,} validation bytes in windows of {long}. Bands "
        "marked * lie beyond the training context. Bits/byte: mean over seeds at the tuned lr. "
        f"In-context fall: band {bands[inside]} minus band {bands[early]} in the windows of {scale.context} "
        f"(negative: the loss keeps falling with position); beyond: band {bands[-1]} minus band "
        f"{bands[inside]} (positive: it rises past the training context); mean ± sd over seeds.",
        table(["mixer", "parameters", "lr", f"val bits/byte (ctx {scale.context})", *bands, "in-context fall",
               "beyond", "train s"], rows),
    ]) + "\n"  # fmt: skip
    plots = {NAME: dict(series=series, xlabel="token position (log bands)", ylabel="bits/byte (band mean)",
                        title=f"Trained at {scale.context}, scored to {long}", logx=True)}  # fmt: skip
    return md, summary, plots


def main(argv: list[str] | None = None) -> dict:
    args = base_parser(__doc__, f"benchmarks/results/evidence/{NAME}").parse(argv)
    specs = [SPECS[0], SPECS[4]] if args.quick else SPECS
    return run_experiment(NAME, argv, args, specs, scale_from_args(args, FULL), summarise)


if __name__ == "__main__":
    main()
