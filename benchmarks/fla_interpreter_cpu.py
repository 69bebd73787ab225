"""fla-core's Triton kernels for the family rules, run by the Triton interpreter on CPU, against our
chunk form (``impl="fla"`` vs ``impl="chunk"`` through the public ops, float32).

    TRITON_INTERPRET=1 python benchmarks/fla_interpreter_cpu.py          # every rule, five problems
    TRITON_INTERPRET=1 python benchmarks/fla_interpreter_cpu.py --rules kda --problems base

Problems (from ``tests/ops/family/family_cases.make_case``, with an initial state; decays in (0.5, 1)):
``base`` B=1 H=2 T=40 Dk=16 Dv=32 (the test's case), ``two_chunks`` B=2 H=2 T=72 (past fla's chunk of
64), ``strong_decay`` as ``base`` with decays in (0.01, 1), ``one_token`` T=1, ``wide_heads`` B=1 H=1 T=40
Dk=64 Dv=96 (heads wider than the blocks fla picks without a GPU, so they are tiled). Per problem: the max abs
difference of the output, of the final state and of the worst gradient (relative to max(1, max |x|)),
and the wall time of fla's forward + backward under the interpreter (not a speed: a cost of the test).
Results go to stdout as Markdown rows; ``benchmarks/results/fla_interpreter_cpu.md`` holds a run.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") != "1":
    sys.exit("run with TRITON_INTERPRET=1 (Triton reads it when fla's kernels are first imported)")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "ops" / "family"))
from family_cases import grads, make_case  # noqa: E402

from ttt.ops.family.fla_backend import FLA_KERNELS  # noqa: E402
from ttt.recipes.args import Parser

PROBLEMS = {
    "base": {"B": 1, "H": 2, "T": 40},
    "two_chunks": {"B": 2, "H": 2, "T": 72},
    "strong_decay": {"B": 1, "H": 2, "T": 40},
    "one_token": {"B": 1, "H": 2, "T": 1},
    "wide_heads": {"B": 1, "H": 1, "T": 40, "Dk": 64, "Dv": 96},
}


def compare(rule: str, problem: str) -> str:
    """One Markdown row: errors of impl="fla" against impl="chunk", or the exception fla raised."""
    shape = {"Dk": 16, "Dv": 32, **PROBLEMS[problem]}
    case = make_case(rule, **shape, dtype=torch.float32, seed=3)
    if problem == "strong_decay":
        name = next((n for n in ("alpha", "decay") if n in case.leaves), None)
        if name is None:
            return f"| `{rule}` | {problem} | (no decay) | | | |"
        g = torch.Generator().manual_seed(5)
        alpha = 0.01 + 0.99 * torch.rand(case.leaves[name].shape, generator=g)
        case.leaves[name] = alpha.requires_grad_(True)
    o, S, d = grads(case, "chunk", 16)
    start = time.perf_counter()
    try:
        fo, fS, fd = grads(case, "fla", 16)
    except Exception as err:  # noqa: BLE001 -- the row records what fla raised
        return f"| `{rule}` | {problem} | no: {type(err).__name__}: {str(err).splitlines()[0][:120]} | | | |"
    seconds = time.perf_counter() - start

    def err(a, b):
        return (a.double() - b.double()).abs().max().item()

    worst = max(d, key=lambda n: err(d[n], fd[n]) / max(1.0, d[n].abs().max().item()))
    return (
        f"| `{rule}` | {problem} | {err(o, fo):.1e} | {err(S, fS):.1e} | "
        f"{err(d[worst], fd[worst]):.1e} (`d{worst}`, max abs {d[worst].abs().max().item():.1f}) | {seconds:.1f} |"
    )


def main() -> None:
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--rules", nargs="*", default=sorted(FLA_KERNELS), choices=sorted(FLA_KERNELS))
    parser.add_argument("--problems", nargs="*", default=list(PROBLEMS), choices=list(PROBLEMS))
    args = parser.parse()
    torch.set_num_threads(1)
    print("| rule | problem | output | final state | worst gradient | fla fwd+bwd s |")
    print("|---|---|---|---|---|---|")
    for rule in args.rules:
        for problem in args.problems:
            print(compare(rule, problem), flush=True)


if __name__ == "__main__":
    main()
