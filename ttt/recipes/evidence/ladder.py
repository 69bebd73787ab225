"""The TTT-Linear ladder (the TTT paper's Table 1 path) and the inner mini-batch size, as far as the
library's switches reach.

    python -m ttt.recipes.evidence.ladder --lrs 1e-3,3e-3,1e-2
    python -m ttt.recipes.evidence.ladder --only ttt-b1,ttt-b4 --seeds 0
    python -m ttt.recipes.evidence.ladder --quick                        # pipeline check, seconds

The paper's path: linear attention -> TTT equivalence -> learnable W0 -> LayerNorm + residual in f ->
mini-batch TTT -> learnable inner lr -> (M) backbone (15.91 -> 11.09 perplexity there). The rungs this
recipe trains, each the tiny byte-level LM at equal parameters and tokens (``ttt train``'s 600 steps of
16 x 128 bytes):

- ``linear-attention``: ``linear_attention`` (elu+1 features, no positions, no convolution);
- ``ttt-b128``: TTT-Linear with one mini-batch per 128-byte window (batch GD over the window);
- ``ttt-b64``, ``ttt-b16`` (the default), ``ttt-b4``, ``ttt-b1``: the mini-batch size b (quality and time);
- ``ttt-M``: mini-batch 16 with the (M) short convolutions (``share_qk``).

Not trainable here, because the layer has no switch for them: "TTT equivalence" (W0 = 0, no LayerNorm,
no residual), W0 frozen, LayerNorm + residual off, the inner lr gate frozen. Training seconds per run
are reported for the time side of b.
"""

from __future__ import annotations

from .common import (
    RunSpec,
    Scale,
    at_best_lr,
    base_parser,
    run_experiment,
    scale_from_args,
    scored_at_best_lr,
    table,
)
from .stats import fmt_ms, mean_spread

__all__ = ["SPECS", "main"]

NAME = "ladder"

SPECS = [
    RunSpec("linear-attention", "linear_attention"),
    RunSpec("ttt-b128", "ttt_linear", {"mini_batch_size": 128}),
    RunSpec("ttt-b64", "ttt_linear", {"mini_batch_size": 64}),
    RunSpec("ttt-b16", "ttt_linear"),
    RunSpec("ttt-b4", "ttt_linear", {"mini_batch_size": 4}),
    RunSpec("ttt-b1", "ttt_linear", {"mini_batch_size": 1}),
    RunSpec("ttt-M", "ttt_linear", {"share_qk": True}),
]

FULL = Scale(eval_contexts=(128,), eval_tokens=131072)


def summarise(records: list[dict], specs: list[RunSpec], scale: Scale) -> tuple[str, dict, dict]:
    summary, rows, xs, ys = {}, [], [], []
    for i, spec in enumerate(specs):
        runs = at_best_lr(records, spec.label)
        if not runs:
            continue
        summary[spec.label] = scored_at_best_lr(runs, str(scale.eval_contexts[0]))
        scored = summary[spec.label]["eval_bits_per_byte"]
        rows.append([f"`{spec.label}`", f"{runs[0]['num_params']:,}", f"{runs[0]['lr']:g}", fmt_ms(scored),
                     f"{mean_spread(summary[spec.label]['train_seconds'])[0]:.0f}"])  # fmt: skip
        xs.append(i)
        ys.append(mean_spread(scored)[0])
    md = "\n\n".join([
        "# The TTT-Linear ladder and the mini-batch size",
        f"Scale: preset `{scale.preset}`, {scale.steps} steps of {scale.batch_size} x {scale.context} bytes, "
        f"{scale.threads} thread(s); bits/byte on {scale.eval_tokens:,} validation bytes, mean ± sd over "
        "seeds.",
        table(["rung", "parameters", "lr", "bits/byte", "train s"], rows),
    ]) + "\n"  # fmt: skip
    plots = {NAME: dict(series={"bits/byte": (xs, ys)}, xlabel="rung (table order)", ylabel="bits/byte",
                        title="TTT-Linear ladder")}  # fmt: skip
    return md, summary, plots


def main(argv: list[str] | None = None) -> dict:
    args = base_parser(__doc__, f"benchmarks/results/evidence/{NAME}").parse(argv)
    specs = [SPECS[0], SPECS[3]] if args.quick else SPECS
    return run_experiment(NAME, argv, args, specs, scale_from_args(args, FULL), summarise)


if __name__ == "__main__":
    main()
