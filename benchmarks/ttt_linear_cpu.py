"""CPU benchmark of TTT-Linear's execution forms, side by side in one run.

    python benchmarks/ttt_linear_cpu.py                 # full run (~10 min on 2 cores)
    python benchmarks/ttt_linear_cpu.py --quick         # smaller sweep, for a smoke test

Shapes: B=1, H=4, D=64, mini-batch 16, float32. Reports medians. It first checks that the chunked
form matches the autograd reference in float64 and refuses to time a wrong path. fla-core's
``chunk_ttt_linear_ref`` is timed at the same shapes when installed; it computes different math (its
output is ``z + LN(z)`` with scaled q, a row-wise eta and zero-padded remainders), so only its
timing is compared.
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import statistics
import time
from pathlib import Path

import torch

import ttt
from ttt.recipes.args import Parser
from ttt.testing import max_abs_diff, ttt_inputs

B, H, D, MB = 1, 4, 64, 16


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def ours(T: int, impl: str, backward: bool):
    x = ttt_inputs(B, H, T, D, dtype=torch.float32, lr_scale=1.0 / D, requires_grad=backward)

    def run():
        args = (x["q"], x["k"], x["v"], x["lr"], x["ln_weight"], x["ln_bias"])
        o = ttt.ops.ttt_linear(*args, initial_state=x["initial_state"], mini_batch_size=MB, impl=impl).output
        if backward:
            o.sum().backward()

    return run


def fla_reference(T: int, backward: bool):
    from fla.ops.ttt.naive import chunk_ttt_linear_ref

    x = ttt_inputs(B, H, T, D, dtype=torch.float32, lr_scale=1.0 / D, requires_grad=backward)
    eta = x["lr"].transpose(1, 2)[..., None]
    W0 = x["initial_state"][0].detach().expand(B, H, D, D).clone().requires_grad_(backward)
    b0 = (
        x["initial_state"][1].detach().reshape(1, H, 1, D).expand(B, H, 1, D).clone().requires_grad_(backward)
    )

    def run():
        # fla takes [B, T, H, D] and scales q in place, so it gets fresh (non-leaf) copies
        q, k, v = (x[n].transpose(1, 2).contiguous() for n in ("q", "k", "v"))
        o, _, _ = chunk_ttt_linear_ref(q, k, v, x["ln_weight"], x["ln_bias"], eta, mini_batch_size=MB,
                                       initial_state=W0, initial_state_bias=b0)  # fmt: skip
        if backward:
            o.sum().backward()

    return run


def correctness_gate() -> float:
    x = ttt_inputs(1, 2, 50, 8)
    args = (x["q"], x["k"], x["v"], x["lr"], x["ln_weight"], x["ln_bias"])
    ref = ttt.ops.ttt_linear(*args, initial_state=x["initial_state"], impl="reference").output
    out = ttt.ops.ttt_linear(*args, initial_state=x["initial_state"], impl="chunk").output
    err = max_abs_diff(out, ref)
    if err > 1e-10:
        raise SystemExit(f"chunk form disagrees with the reference ({err:.2e}); refusing to time it")
    return err


def main() -> None:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="T up to 4k, fewer repeats")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "ttt_linear_cpu.md")
    args = p.parse()
    torch.set_num_threads(args.threads)
    err = correctness_gate()
    lengths = [1024, 2048, 4096] if args.quick else [1024, 2048, 4096, 8192, 16384]
    reps = 3 if args.quick else 5
    lines = [
        f"# TTT-Linear on CPU ({platform.processor() or platform.machine()}, {args.threads} threads, "
        f"torch {torch.__version__})",
        "",
        f"B={B} H={H} D={D} mini-batch={MB}, float32, median of {reps} (reference: 3 forward runs, 1 forward+backward run).",
        f"Correctness gate: chunk vs autograd reference, float64, max |diff| = {err:.1e}.",
        "",
        "## Chunked dual form vs token-by-token autograd reference, T = 2048",
        "",
        "| pass | reference (s) | chunk (s) | speed-up |",
        "|---|---|---|---|",
    ]
    for backward, name in ((False, "forward"), (True, "forward+backward")):
        r = median_time(ours(2048, "reference", backward), 1 if backward else 3)
        c = median_time(ours(2048, "chunk", backward), reps)
        lines.append(f"| {name} | {r:.3f} | {c:.4f} | {r / c:.1f}x |")
        print(lines[-1], flush=True)
    have_fla = importlib.util.find_spec("fla") is not None
    lines += ["", "## Time vs T (chunk) and fla-core's `chunk_ttt_linear_ref`", ""]
    lines += [
        "| T | chunk fwd (s) | chunk fwd+bwd (s) | fla fwd (s) | fla fwd+bwd (s) | fla / ours (fwd, fwd+bwd) |"
    ]
    lines += ["|---|---|---|---|---|---|"]
    first = None
    for T in lengths:
        f = median_time(ours(T, "chunk", False), reps)
        fb = median_time(ours(T, "chunk", True), reps)
        first = first or (f, fb)
        if have_fla:
            ff, ffb = median_time(fla_reference(T, False), reps), median_time(fla_reference(T, True), reps)
            lines.append(
                f"| {T} | {f:.4f} | {fb:.4f} | {ff:.4f} | {ffb:.4f} | {ff / f:.2f}x / {ffb / fb:.2f}x |"
            )
        else:
            lines.append(f"| {T} | {f:.4f} | {fb:.4f} | n/a | n/a | fla-core not installed |")
        print(lines[-1], flush=True)
    growth = f"forward {f / first[0]:.1f}, forward+backward {fb / first[1]:.1f}"
    lines += [
        "",
        f"Growth time(T={lengths[-1]}) / time(T={lengths[0]}): {growth} (linear: {lengths[-1] // lengths[0]}).",
    ]
    print(lines[-1])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
