"""Where in a long window does a converted model stop gaining from context, and how much of that is the TTT
inner update? Scores the same held-out windows for the teacher and each ``ttt convert`` run:

- perplexity over position buckets of each window (positions 0-15, 16-63, 64-255, 256-1023, ...): a model
  that uses its context keeps falling from bucket to bucket, as the teacher does;
- with ``--inner-lr-scale``, the same for each run with every TTT mixer's inner learning rate
  (``base_lr``) multiplied by each factor: 0 freezes the fast weights at their learned initial value
  (the converted blocks then see no other token), 2 doubles every inner step;
- the mean of each TTT mixer's inner-lr gate (``sigmoid(x w_h + b_h)``, in (0, 1)) over the first
  held-out window, per block: a gate near 1 means ``base_lr`` caps the step the training wanted.

    python benchmarks/convert_context_probe.py RUN [RUN ...] --context 2048 --tokens 16384 \
        --inner-lr-scale 0,0.5,2 --out benchmarks/results/convert_smollm2_cpu_context_probe

Held-out text: the first ``--tokens`` tokens of the first run's corpus's validation split (never trained
on), cut into windows of ``--context``. Mixers without ``base_lr`` (attention, Gated DeltaNet, ...) are
left as they are; a run with no TTT mixer gets no scaled rows.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import Tensor, nn


def buckets(context: int) -> list[tuple[int, int]]:
    """``[(start, end)]``: 0-15, 16-63, then powers of 4 up to ``context`` (the last one cut there)."""
    edges = [0, min(16, context)]
    while edges[-1] < context:
        edges.append(min(edges[-1] * 4, context))
    return list(zip(edges, edges[1:]))


def profile(model: nn.Module, tokens: Tensor, context: int) -> dict:
    """Perplexity of ``model`` on ``tokens`` in windows of ``context``: overall and per position bucket."""
    from ttt.recipes.eval import evaluate_loss

    loss, by_position = evaluate_loss(
        model, tokens, batch_size=1, context=context, max_batches=None, device=torch.device("cpu")
    )
    return {
        "perplexity": math.exp(loss),
        "buckets": {f"{a}-{b - 1}": math.exp(float(by_position[a:b].mean())) for a, b in buckets(context)},
    }


def inner_lrs(model: nn.Module) -> dict[nn.Module, float]:
    """``{mixer: base_lr}`` of every mixer that has an inner learning rate (the TTT mixers)."""
    return {m: m.base_lr for m in model.modules() if isinstance(getattr(m, "base_lr", None), float)}


@torch.no_grad()
def gate_means(model: nn.Module, tokens: Tensor, context: int) -> dict[str, float]:
    """``{block: mean inner-lr gate}`` of every TTT mixer, over the first window of ``tokens``."""
    means: dict[str, float] = {}
    hooks = []
    for name, module in model.named_modules():
        gate = getattr(module, "lr_gate", None)
        if isinstance(gate, nn.Linear) and isinstance(getattr(module, "base_lr", None), float):
            block = name.split(".")[1] if name.startswith("blocks.") else name

            def keep(_m, _i, out, block=block):
                means[block] = float(torch.sigmoid(out).mean())

            hooks.append(gate.register_forward_hook(keep))
    try:
        model(tokens[:context][None])
    finally:
        for h in hooks:
            h.remove()
    return means


def table(report: dict) -> str:
    """The markdown tables of a report (``{"context", "tokens", "rows"}``, as the JSON this writes)."""
    rows = report["rows"]
    names = list(rows[0]["buckets"])
    lines = [
        f"Perplexity by position in windows of {report['context']} tokens (the first {report['tokens']:,} held-out "
        "tokens)",
        "",
        "| model | inner lr x | all | " + " | ".join(f"positions {n}" for n in names) + " |",
        "|---" * (3 + len(names)) + "|",
    ]
    for r in rows:
        scale = "" if r["inner_lr_scale"] is None else f"{r['inner_lr_scale']:g}"
        lines.append(f"| {r['model']} | {scale} | {r['perplexity']:.2f} | "
                     + " | ".join(f"{r['buckets'][n]:.2f}" for n in names) + " |")  # fmt: skip
    gated = [r for r in rows if r.get("gates")]
    if gated:
        lines += ["", "Mean inner-lr gate per converted block (first window)", ""]
        for r in gated:
            g = r["gates"]
            lines.append(f"- {r['model']}: " + ", ".join(f"{b}: {v:.2f}" for b, v in g.items()))
    return "\n".join(lines) + "\n"


def main() -> None:
    from ttt.models.checkpoint import load_model, write_text_atomic
    from ttt.recipes.args import Parser, positive_int
    from ttt.recipes.convert import load_teacher, read_summary
    from ttt.recipes.evidence.common import factor_list

    p = Parser(description=__doc__)
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--out", required=True)
    p.add_argument("--context", type=positive_int, default=2048)
    p.add_argument("--tokens", type=positive_int, default=16384, help="held-out tokens scored")
    p.add_argument(
        "--inner-lr-scale",
        type=factor_list,
        default=[],
        help="comma-separated factors for every TTT mixer's base_lr (e.g. 0,2)",
    )
    p.add_argument("--threads", type=positive_int, default=1)
    args = p.parse()
    if args.context > args.tokens:
        p.error(f"--context {args.context} is longer than --tokens {args.tokens}")
    missing = [
        str(run) for run in args.runs if not (run / "convert.json").is_file() or not (run / "hf").is_dir()
    ]
    if missing:
        p.error(
            f"no convert.json and hf/ in {', '.join(missing)}: expected finished ttt convert run directories"
        )
    out = Path(args.out)
    if not out.parent.is_dir():
        p.error(f"--out {out}: no directory {out.parent} to write the report into")
    torch.set_num_threads(args.threads)
    try:
        first = read_summary(args.runs[0])["args"]
    except (OSError, ValueError) as e:
        p.error(str(e))
    try:
        teacher, tok = load_teacher(first["teacher"], first.get("first_blocks"))
    except (OSError, ValueError) as e:
        p.error(f"{args.runs[0]}: its teacher: {e}")
    from ttt.data import load_corpus, prepare

    held = prepare(load_corpus(first["corpus"]), tok).validation[: args.tokens + 1]
    if held.numel() <= args.context:
        p.error(f"the held-out split has {held.numel():,} tokens, too few for --context {args.context}")
    rows = [{"model": "teacher", "run": None, "inner_lr_scale": None, **profile(teacher, held, args.context)}]
    print(rows[-1], flush=True)
    del teacher
    for run in args.runs:
        model = load_model(run / "hf")[0].eval()
        rows.append({"model": run.name, "run": str(run), "inner_lr_scale": 1.0,
                     "gates": gate_means(model, held, args.context), **profile(model, held, args.context)})  # fmt: skip
        print({k: v for k, v in rows[-1].items() if k != "gates"}, flush=True)
        base = inner_lrs(model)
        for f in args.inner_lr_scale if base else []:
            for mixer, lr in base.items():
                mixer.base_lr = lr * f
            rows.append({"model": run.name, "run": str(run), "inner_lr_scale": f,
                         **profile(model, held, args.context)})  # fmt: skip
            print(rows[-1], flush=True)
        for mixer, lr in base.items():
            mixer.base_lr = lr
        del model
    write_text_atomic(out.with_suffix(".json"), json.dumps({"context": args.context, "tokens": held.numel() - 1,
                                                            "rows": rows}, indent=1) + "\n")  # fmt: skip
    text = table({"context": args.context, "tokens": held.numel() - 1, "rows": rows})
    write_text_atomic(out.with_suffix(".table.md"), text)
    print(text)


if __name__ == "__main__":
    main()
