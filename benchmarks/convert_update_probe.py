"""Which part of a training update changed a converted model's perplexity? Takes two checkpoints of one
``ttt convert`` (or ``ttt train``) run, applies the update between them one parameter group at a time to
the earlier weights, and re-scores held-out perplexity after each.

    python benchmarks/convert_update_probe.py RUN --before step-000020 --after step-000030 \
        --per-block mixer.o_proj.weight --blocks 0,1,2 --controls blocks.0.mixer.o_proj.weight \
        --out benchmarks/results/convert_update_probe_ttt_mlp

Rows:
- a group: every tensor of that name in every block (``mixer.o_proj.weight``, ...; the tensors outside
  the mixers form one group, ``non-mixer``), then ``all mixer`` and ``all`` (= the later checkpoint);
- ``--per-block NAME``: that tensor (or, for a module such as ``mixer``, all its tensors) of each block in
  ``--blocks`` alone, and of all the other blocks; with ``--leave-out``, also the update of every block but
  each one in ``--blocks`` (where the damage needs several blocks' updates together);
- ``--leave-out``: also ``all mixer`` but one group, for each mixer group (which tensors the damage needs),
  and with ``--per-block MODULE --blocks ...`` each listed block's module update but one tensor's, for each
  of its tensors;
- ``--controls TENSOR``: whether the update of one tensor matters by its size or by its direction: a
  random direction of the same norm, the same per-element sizes with random signs, and the update scaled
  by 0.25 and 0.5.

Held-out text, context and tokenizer are the run's (its checkpoint metadata); ``--windows`` windows of the
validation split, the first ones, the same for every row.
"""

from __future__ import annotations

import math
import os
import re
import sys
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, os.path.dirname(__file__))

from _harness import finish_report  # noqa: E402

from ttt.recipes.args import Parser  # noqa: E402


def group_of(name: str) -> str:
    """``blocks.3.mixer.o_proj.weight`` -> ``mixer.o_proj.weight``; tensors outside the mixers -> ``non-mixer``."""
    plain = re.sub(r"^blocks\.\d+\.", "", name)
    return plain if plain.startswith("mixer.") else "non-mixer"


def probe(run: Path, before: str, after: str, *, windows: int, per_block: str | None, blocks: list[int] | None,
          controls: list[str], leave_out: bool = False, seed: int = 0) -> list[dict]:  # fmt: skip
    """``[{"row", "kind", "perplexity"}]``: the before and after weights, then each row of the docstring."""
    from ttt.data import load_corpus, prepare
    from ttt.data.tokenizer import tokenizer_from_dict
    from ttt.models.checkpoint import load_checkpoint, load_model
    from ttt.recipes.eval import evaluate_loss

    model, meta = load_model(run / before)
    model.eval()
    a, _, _ = load_checkpoint(run / before)
    b, _, _ = load_checkpoint(run / after)
    if set(a) != set(b):
        raise SystemExit(f"{before} and {after} hold different tensors: not two checkpoints of one run")
    args = meta.get("args", {})
    corpus, context = args.get("corpus", "shakespeare"), int(args.get("context", model.config.max_seq_len))
    val = prepare(load_corpus(corpus), tokenizer_from_dict(meta["tokenizer"])).validation

    def score(update: dict[str, Tensor]) -> float:
        model.load_state_dict({**a, **update}, strict=False)
        with torch.no_grad():
            loss, _ = evaluate_loss(model, val, batch_size=1, context=context, max_batches=windows,
                                    device=torch.device("cpu"))  # fmt: skip
        return math.exp(loss)

    rows = [{"row": before, "kind": "before", "perplexity": score({})}]
    groups: dict[str, list[str]] = {}
    for name in a:
        groups.setdefault(group_of(name), []).append(name)
    groups["all mixer"] = [n for n in a if group_of(n) != "non-mixer"]
    groups["all"] = list(a)
    for group, names in groups.items():
        rows.append({"row": group, "kind": "group", "perplexity": score({n: b[n] for n in names})})
    mixer_groups = [g for g in groups if g.startswith("mixer.")]
    for group in mixer_groups if leave_out else []:
        rest = {n: b[n] for g in mixer_groups if g != group for n in groups[g]}
        rows.append({"row": f"all mixer but {group}", "kind": "all but one group", "perplexity": score(rest)})
    if per_block:
        # a tensor, or every tensor of a module (``mixer``)
        part = re.compile(rf"^blocks\.(\d+)\.{re.escape(per_block)}(\..+)?$")
        owned: dict[int, list[str]] = {}
        for n in a:
            if m := part.match(n):
                owned.setdefault(int(m.group(1)), []).append(n)
        if not owned:
            raise SystemExit(f"--per-block {per_block}: no tensor blocks.N.{per_block}(.*) in the checkpoint")
        owners = sorted(owned)
        chosen = owners if blocks is None else [i for i in blocks if i in owned]
        for i in chosen:
            rows.append({"row": f"blocks.{i}.{per_block}", "kind": "block",
                         "perplexity": score({n: b[n] for n in owned[i]})})  # fmt: skip
        rest = [n for i in owners if i not in chosen for n in owned[i]]
        if rest:
            others = len(owners) - len(chosen)
            rows.append({"row": f"{per_block} of the {others} other blocks", "kind": "block",
                         "perplexity": score({n: b[n] for n in rest})})  # fmt: skip
        for i in chosen if leave_out else []:
            rows.append({"row": f"{per_block} of every block but {i}", "kind": "all but one block",
                         "perplexity": score({n: b[n] for j in owners if j != i for n in owned[j]})})  # fmt: skip
            if blocks is not None and len(owned[i]) > 1:  # a module: its update but one tensor's, each tensor
                for t in owned[i]:
                    rest = {n: b[n] for n in owned[i] if n != t}
                    rows.append({"row": f"blocks.{i}.{per_block} but {t}", "kind": "block but one tensor",
                                 "perplexity": score(rest)})  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    for n in controls:
        if n not in a:
            raise SystemExit(f"--controls {n}: no such tensor in the checkpoint")
        d = b[n] - a[n]
        variants = {
            "random direction, same norm": torch.randn(d.shape, generator=gen) * d.norm() / d.numel() ** 0.5,
            "same per-element sizes, random signs": torch.sign(torch.randn(d.shape, generator=gen)) * d.abs(),
            "the update x 0.25": 0.25 * d,
            "the update x 0.5": 0.5 * d,
            "the update": d,
        }
        for label, delta in variants.items():
            rows.append({"row": f"{n}: {label}", "kind": "control", "perplexity": score({n: a[n] + delta})})
    return rows


def main(argv: list[str] | None = None) -> None:
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="run directory holding both checkpoints")
    p.add_argument("--before", required=True, help="earlier checkpoint directory name, e.g. step-000020")
    p.add_argument("--after", required=True, help="later checkpoint directory name, e.g. step-000030")
    p.add_argument("--windows", type=int, default=4, help="held-out windows scored per row (default: 4)")
    p.add_argument(
        "--per-block",
        help="also apply this tensor's (or module's) update block by block (e.g. mixer.o_proj.weight, mixer)",
    )
    p.add_argument(
        "--leave-out",
        action="store_true",
        help="also every mixer group's update but each one's, and with --per-block every block's but each one's",
    )
    p.add_argument("--blocks", help="comma-separated blocks for --per-block (default: all)")
    p.add_argument(
        "--controls", default="", help="comma-separated tensor names for the size/direction controls"
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, help="write OUT.md and OUT.json (default: print only)")
    a = p.parse(argv)
    torch.set_num_threads(a.threads)
    blocks = [int(i) for i in a.blocks.split(",")] if a.blocks else None
    controls = [c for c in a.controls.split(",") if c]
    rows = probe(a.run, a.before, a.after, windows=a.windows, per_block=a.per_block, blocks=blocks,
                 controls=controls, leave_out=a.leave_out)  # fmt: skip
    lines = [f"Update {a.before} -> {a.after} of `{a.run}`, applied in parts to the {a.before} weights; "
             f"held-out perplexity on {a.windows} windows.", "", "| update applied | kind | perplexity |",
             "|---|---|---|"]  # fmt: skip
    lines += [f"| {r['row']} | {r['kind']} | {r['perplexity']:.1f} |" for r in rows]
    finish_report("convert_update_probe.py", lines, {"rows": rows}, argv, a.out)


if __name__ == "__main__":
    main()
