"""The (a) == (b) == (c) table of the family: for every family rule, the largest difference between the
autograd-from-objective form (a), the closed-form recurrence (b) and the chunk form (c), float64,
forward (output and final state) and every gradient (q, k, v, gates, initial state).

    python benchmarks/family_forms.py          # prints the table, writes benchmarks/results/family_forms.md

Shape: B=2, H=2, T=45 (not a multiple of the chunk 24, which the chunk form inverts as a 16-block and a
 partial 8-block), Dk=6, Dv=5, random initial state.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "ops" / "family"))
from family_cases import ALL_RULES, grads, make_case  # noqa: E402

from ttt.ops.family.rules import RULES  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    rows = []
    header = "| rule | recurrence (b) | max err fwd (b) vs (a) | (c) vs (a) | max err grads (b) vs (a) | (c) vs (a) |"
    lines = [header, "|---|---|---|---|---|---|"]
    for rule in ALL_RULES:
        case = make_case(rule, B=2, H=2, T=45, Dk=6, Dv=5, seed=0)
        o_a, S_a, g_a = grads(case, "autograd")
        errs = {}
        for impl in ("recurrent", "chunk"):
            o, S, g = grads(case, impl, chunk_size=24)
            fwd = max((o - o_a).abs().max().item(), (S - S_a).abs().max().item())
            bwd = max((g[n] - g_a[n]).abs().max().item() for n in g_a)
            errs[impl] = (fwd, bwd)
        name = rule.replace("_per_column", "")
        formula = RULES[name].recurrence.split("  (")[0]
        label = rule if rule == name else f"{name} (beta per value column)"
        lines.append(
            f"| {label} | `{formula}` | {errs['recurrent'][0]:.1e} | {errs['chunk'][0]:.1e} | "
            f"{errs['recurrent'][1]:.1e} | {errs['chunk'][1]:.1e} |"
        )
        rows.append((rule, errs))
    text = "\n".join(lines)
    print(text)
    out = Path(__file__).resolve().parent / "results" / "family_forms.md"
    out.write_text(
        "# Family rules: (a) autograd objective == (b) closed-form recurrence == (c) chunk form\n\n"
        "float64, B=2 H=2 T=45 Dk=6 Dv=5, chunk 24, random S_0; gradients of a random linear functional of\n"
        "(o, S_T) w.r.t. q, k, v, every gate and S_0. Produced by `python benchmarks/family_forms.py`.\n\n"
        + text
        + "\n"
    )


if __name__ == "__main__":
    main()
