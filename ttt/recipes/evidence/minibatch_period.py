"""Does TTT's loss repeat with the inner mini-batch period, and which part of the rule makes it?

    python -m ttt.recipes.evidence.minibatch_period                 # all variants, seeds 0,1,2
    python -m ttt.recipes.evidence.minibatch_period --only linear-default,linear-eta-const --seeds 0
    python -m ttt.recipes.evidence.minibatch_period --quick         # pipeline check, seconds

Trains the tiny byte-level LM (``ttt train``'s model and data: 16 x 128 bytes of Shakespeare a step,
equal parameters through ``--match-params attention``; 300 steps, half the default, to fit a shared
CPU) with TTT variants that differ in one switch of the layer, then scores every validation position of
512 windows of 128 bytes and 64 windows of 1,024 bytes. Per variant it reports the loss profile over the
16 positions of a mini-batch (each position's loss minus a centred moving average over one period, so a
smooth trend with position cancels: ``stats.detrended_phase_profile``), the boundary
excess (phases 15, 0, 1 minus phases 4-11, bits/byte), the validation bits/byte, and the first and last
128-position bands of the 1,024-byte windows (8x the training context).

The variants (``RunSpec`` labels):

- ``linear-default``: TTT-Linear as the paper (``token_eta = 1/(i+1)``, RoPE with positions mod 16);
- ``linear-eta-const``: ``token_eta_base="constant"`` (``1/16`` at every position: same end-of-block weights);
- ``linear-norope``: ``rope=False``;
- ``linear-const-norope``: both;
- ``linear-shareqk``: the short convolutions of the (M) variant;
- ``linear-fixed-eta``: ``learn_token_eta=False`` (``token_eta`` stays ``1/(i+1)``; its last entry, the
  weight of each mini-batch's update in the weights carried forward, cannot be learned down to 0);
- ``linear-lr0.1``: inner ``base_lr=0.1`` instead of 1.0;
- ``linear-b4``, ``linear-b1``: mini-batch 4 and 1;
- ``mlp-default``, ``mlp-eta-const``: TTT-MLP as the paper and with the constant base.

Writes ``minibatch_period.{md,json}``, ``minibatch_period_phase.png`` and ``minibatch_period_position.png``
into ``--out`` (cached runs in ``--out/cache``: rerunning resumes).
"""

from __future__ import annotations

from .common import (
    RunSpec,
    Scale,
    at_best_lr,
    base_parser,
    run_experiment,
    scale_from_args,
    table,
)
from .stats import boundary_excess, detrended_phase_profile, fmt_ms, mean_spread

__all__ = ["SPECS", "main"]

NAME = "minibatch_period"
PERIOD = 16

SPECS = [
    RunSpec("linear-default", "ttt_linear"),
    RunSpec("linear-eta-const", "ttt_linear", {"token_eta_base": "constant"}),
    RunSpec("linear-norope", "ttt_linear", {"rope": False}),
    RunSpec("linear-const-norope", "ttt_linear", {"token_eta_base": "constant", "rope": False}),
    RunSpec("linear-shareqk", "ttt_linear", {"share_qk": True}),
    RunSpec("linear-fixed-eta", "ttt_linear", {"learn_token_eta": False}),
    RunSpec("linear-lr0.1", "ttt_linear", {"base_lr": 0.1}),
    RunSpec("linear-b4", "ttt_linear", {"mini_batch_size": 4}),
    RunSpec("linear-b1", "ttt_linear", {"mini_batch_size": 1}),
    RunSpec("mlp-default", "ttt_mlp"),
    RunSpec("mlp-eta-const", "ttt_mlp", {"token_eta_base": "constant"}),
]

FULL = Scale(steps=300, eval_contexts=(128, 1024), eval_tokens=65536)


def summarise(records: list[dict], specs: list[RunSpec], scale: Scale) -> tuple[str, dict, dict]:
    """The markdown report, the JSON summary and the plots of the cached ``records``."""
    short, long = (str(c) for c in (scale.eval_contexts[0], scale.eval_contexts[-1]))
    rows, summary, phase_series, position_series = [], {}, {}, {}
    band = scale.context
    for spec in specs:
        runs = at_best_lr(records, spec.label)
        if not runs:
            continue
        bpn = runs[0]["bits_per_nat"]
        profiles = {ctx: [detrended_phase_profile(r["by_position"][ctx], PERIOD) * bpn for r in runs]
                    for ctx in (short, long)}  # fmt: skip
        excess = {ctx: [boundary_excess(p) for p in profiles[ctx]] for ctx in profiles}
        first = [sum(r["by_position"][long][:band]) / band * bpn for r in runs]
        last = [sum(r["by_position"][long][-band:]) / band * bpn for r in runs]
        mean_profile = [mean_spread([float(p[k]) for p in profiles[long]])[0] for k in range(PERIOD)]
        summary[spec.label] = {
            "spec": runs[0]["spec"],
            "lr": runs[0]["lr"],
            "seeds": [r["seed"] for r in runs],
            "num_params": runs[0]["num_params"],
            "val_bits_per_byte": [r["val_bits_per_byte"] for r in runs],
            f"boundary_excess_bits_ctx{short}": excess[short],
            f"boundary_excess_bits_ctx{long}": excess[long],
            f"phase_profile_bits_ctx{long}": mean_profile,
            f"first_band_bits_ctx{long}": first,
            f"last_band_bits_ctx{long}": last,
            "train_seconds": [r["train_seconds"] for r in runs],
            "token_eta_last_per_block": [
                [e[-1] for e in r["token_eta"]] if r.get("token_eta") else None for r in runs
            ],
        }
        eta_last = summary[spec.label]["token_eta_last_per_block"]
        eta_text = "; ".join("/".join(f"{v:.2f}" for v in e) if e else "-" for e in eta_last)
        rows.append([f"`{spec.label}`", fmt_ms(summary[spec.label]["val_bits_per_byte"]),
                     fmt_ms(excess[short], 2), fmt_ms(excess[long], 2), fmt_ms(first), fmt_ms(last), eta_text,
                     f"{mean_spread(summary[spec.label]['train_seconds'])[0]:.0f}"])  # fmt: skip
        phase_series[spec.label] = (list(range(PERIOD)), mean_profile)
        n = int(long) // band
        curve = [sum(mean_spread([r["by_position"][long][i] for r in runs])[0]
                     for i in range(k * band, (k + 1) * band)) / band * bpn for k in range(n)]  # fmt: skip
        position_series[spec.label] = ([(k + 0.5) * band for k in range(n)], curve)
    profile_rows = [[f"`{label}`", *(f"{v:+.2f}" for v in s[f"phase_profile_bits_ctx{long}"])]
                    for label, s in summary.items()]  # fmt: skip
    md = "\n\n".join([
        "# Loss by position within the TTT mini-batch",
        f"Scale: preset `{scale.preset}`, {scale.steps} steps of {scale.batch_size} x {scale.context} bytes, "
        f"{scale.threads} thread(s); scored on {scale.eval_tokens:,} validation bytes per context. "
        "Boundary excess: mean detrended loss at phases 15, 0, 1 minus phases 4-11 (bits/byte), mean ± sd "
        "over seeds.",
        table(["variant", "val bits/byte", f"boundary excess, ctx {short}", f"boundary excess, ctx {long}",
               f"bits/byte at positions 0-{band - 1} (ctx {long})",
               f"bits/byte at last {band} positions (ctx {long})",
               "learned token_eta[b-1] per block (per seed)", "train s"], rows),  # fmt: skip
        f"Detrended loss (bits/byte) by position mod {PERIOD}, {long}-byte windows, mean over seeds:",
        table(["variant", *(str(k) for k in range(PERIOD))], profile_rows),
    ]) + "\n"  # fmt: skip
    plots = {
        f"{NAME}_phase": dict(series=phase_series, xlabel=f"position mod {PERIOD}",
                              ylabel="detrended loss (bits/byte)", title="Loss within the mini-batch"),
        f"{NAME}_position": dict(series=position_series, xlabel="token position",
                                 ylabel="bits/byte (band mean)",
                                 title=f"Loss by position, {long}-byte windows"),
    }  # fmt: skip
    return md, summary, plots


def main(argv: list[str] | None = None) -> dict:
    args = base_parser(__doc__, f"benchmarks/results/evidence/{NAME}").parse(argv)
    specs = SPECS[:2] if args.quick else SPECS
    return run_experiment(NAME, argv, args, specs, scale_from_args(args, FULL), summarise)


if __name__ == "__main__":
    main()
