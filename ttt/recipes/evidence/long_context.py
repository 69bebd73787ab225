"""Long context (the TTT paper's claim): does TTT's loss keep falling with position like attention's and
unlike a fixed-state RNN's, and what happens beyond the training context?

    python -m ttt.recipes.evidence.long_context --lrs 1e-3,3e-3,1e-2     # tune on seed 0, then seeds 1, 2
    python -m ttt.recipes.evidence.long_context --only ttt-linear,attention --seeds 0
    python -m ttt.recipes.evidence.long_context --quick                  # pipeline check, seconds

Every mixer trains the tiny byte-level LM (4 blocks x 128, equal parameters through ``--match-params
attention``) on Shakespeare windows of 2,048 bytes, batch 2 (4,096 bytes a step, the same for every
mixer), then scores 16 validation windows of 8,192 bytes (4x the training context) and 64 of 2,048,
position by position. Reported per mixer: validation bits/byte at 2,048 (mean ± sd over seeds at the
tuned lr) and the loss in bands of 512 positions up to 8,192 (the first four bands are inside the
training context).

Mixers (``RunSpec`` labels): ``ttt-linear``, ``ttt-linear-M`` (short convolutions, ``share_qk``),
``ttt-mlp``, ``ttt-mlp-M``, ``attention`` (RoPE), ``swa`` (sliding window 512), ``gated-deltanet``,
``mamba2``.
"""

from __future__ import annotations

from .common import (
    RunSpec,
    Scale,
    at_best_lr,
    base_parser,
    fmt_ms,
    mean_spread,
    run_experiment,
    scale_from_args,
    table,
)

__all__ = ["SPECS", "main"]

NAME = "long_context"

SPECS = [
    RunSpec("ttt-linear", "ttt_linear"),
    RunSpec("ttt-linear-M", "ttt_linear", {"share_qk": True}),
    RunSpec("ttt-mlp", "ttt_mlp"),
    RunSpec("ttt-mlp-M", "ttt_mlp", {"share_qk": True}),
    RunSpec("attention", "attention"),
    RunSpec("swa", "swa"),
    RunSpec("gated-deltanet", "gated_deltanet"),
    RunSpec("mamba2", "mamba2"),
]

FULL = Scale(steps=600, batch_size=2, context=2048, eval_contexts=(2048, 8192), eval_tokens=131072,
             eval_batch_tokens=16384)  # fmt: skip


def summarise(records: list[dict], specs: list[RunSpec], scale: Scale) -> tuple[str, dict, dict]:
    """Markdown, JSON summary and plot of the cached ``records``."""
    long = str(scale.eval_contexts[-1])
    band = max(1, scale.context // 4)
    n_bands = int(long) // band
    summary, rows, series = {}, [], {}
    for spec in specs:
        runs = at_best_lr(records, spec.label)
        if not runs:
            continue
        bpn = runs[0]["bits_per_nat"]
        curves = [[sum(r["by_position"][long][k * band : (k + 1) * band]) / band * bpn
                   for k in range(n_bands)]
                  for r in runs]  # fmt: skip
        mean_curve = [mean_spread([c[k] for c in curves])[0] for k in range(n_bands)]
        tried = sorted({(r["lr"], round(r["val_bits_per_byte"], 4)) for r in records
                        if r["spec"]["label"] == spec.label and r["seed"] == runs[0]["seed"]})  # fmt: skip
        summary[spec.label] = {
            "spec": runs[0]["spec"],
            "lr": runs[0]["lr"],
            "lr_grid_seed0_bits_per_byte": tried,
            "seeds": [r["seed"] for r in runs],
            "num_params": runs[0]["num_params"],
            "val_bits_per_byte": [r["val_bits_per_byte"] for r in runs],
            f"band_bits_per_byte_ctx{long}": curves,
            "train_seconds": [r["train_seconds"] for r in runs],
        }
        rows.append([f"`{spec.label}`", f"{runs[0]['num_params']:,}", f"{runs[0]['lr']:g}",
                     fmt_ms(summary[spec.label]["val_bits_per_byte"]), *(f"{v:.3f}" for v in mean_curve),
                     f"{mean_spread(summary[spec.label]['train_seconds'])[0]:.0f}"])  # fmt: skip
        series[spec.label] = ([(k + 0.5) * band for k in range(n_bands)], mean_curve)
    bands = [
        f"{k * band}-{(k + 1) * band - 1}{'*' if (k + 1) * band > scale.context else ''}"
        for k in range(n_bands)
    ]
    md = "\n\n".join([
        "# Loss by position, trained at a long context",
        f"Scale: preset `{scale.preset}`, {scale.steps} steps of {scale.batch_size} x {scale.context} bytes, "
        f"{scale.threads} thread(s); {scale.eval_tokens:,} validation bytes in windows of {long}. Bands "
        "marked * lie beyond the training context. Bits/byte: mean over seeds at the tuned lr.",
        table(["mixer", "parameters", "lr", f"val bits/byte (ctx {scale.context})", *bands, "train s"], rows),
    ]) + "\n"  # fmt: skip
    plots = {NAME: dict(series=series, xlabel="token position", ylabel="bits/byte (band mean)",
                        title=f"Trained at {scale.context}, scored to {long}", logx=True)}  # fmt: skip
    return md, summary, plots


def main(argv: list[str] | None = None) -> dict:
    args = base_parser(__doc__, f"benchmarks/results/evidence/{NAME}").parse_args(argv)
    specs = [SPECS[0], SPECS[4]] if args.quick else SPECS
    return run_experiment(NAME, argv, args, specs, scale_from_args(args, FULL), summarise)


if __name__ == "__main__":
    main()
