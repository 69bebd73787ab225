"""Benchmark Triton TTT-MLP (fused forward kernel; backward = per-mini-batch recompute in PyTorch) against
our chunked PyTorch form, eager and with its loop body compiled (``ttt.ops.compile_chunk_steps``), forward
and forward+backward, bf16, mini-batch b = 16, hidden M = 4 D, causal.

Each shape is first checked: ours vs the chunked form in float64 on a [1, 2] slice of the batch (output and
grads of q, k, v, lr) with the R13 budget. A path that fails its check is not timed.

FLOPs (matmuls only, 2 m n k each), per (batch, head) and full mini-batch of b tokens starting at offset 0,
where the terms of the carried gradient sum are zero and not counted:

- 7 products of b x D x M: K W1, X2 W2, G2 W2^T, K^T (lr G1), X2^T (lr G2), Q W1, X2bar W2   -> 14 b D M
- 4 products of b x b x (D or M): Q K^T, A1 G1, X2bar X2^T, A2 G2                           -> 4 b^2 (D + M)

    FLOPs_fwd    = B H T (14 D M + 4 b (D + M))
    FLOPs_fwdbwd = 3 FLOPs_fwd

The backward counts two matmuls per forward matmul (every operand needs its gradient). Work that is re-done
(ours re-runs each mini-batch's forward in the backward) is not counted: the rate is model FLOPs / time,
reported against the GPU's bf16 dense peak ``--peak-tflops`` (default 989, the H100/H200 SXM datasheet).

    python benchmarks/kernels_ttt_mlp.py [--shapes B,T,H,D ...] [--out results.md]
    python benchmarks/kernels_ttt_mlp.py --quick --shapes 8,2048,16,64 --out /tmp/mlp.md   # a tight budget
    python benchmarks/kernels_ttt_mlp.py --device cpu --shapes 1,64,2,16                   # CPU smoke test
    python benchmarks/kernels_ttt_mlp.py --dots auto tf32 --skip-eager --skip-compiled     # dot modes side by side

"chunk compiled" is timed after one forward and one forward+backward that compile it (reported as
"compile s"). ``--tf32`` lets the chunked PyTorch paths use TF32 matmuls (the kernel's dot operands:
``TTT_TRITON_DOTS``, ttt/ops/ttt_linear/triton/dot.py); the correctness gate always runs at full fp32 precision. On CPU (no CUDA) the Triton path
runs only under ``TRITON_INTERPRET=1`` and every time is one call, not a benchmark. The markdown table is
rewritten to ``--out`` after every measurement, so a stopped run leaves its partial results.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

sys.path.insert(0, os.path.dirname(__file__))

from _harness import (  # noqa: E402
    bench,
    dots_mode,
    fmt,
    gate,
    ours_name,
    pytorch_mode,
    raise_recompile_limit,
    write_out,
)

from ttt.ops import ttt_mlp  # noqa: E402
from ttt.ops.common import default_token_eta  # noqa: E402
from ttt.recipes.args import Parser

SHAPES = [(8, 2048, 16, 64), (4, 8192, 16, 64)]
MB = 16
MODES = ("fwd", "fwdbwd")
OTHERS = ("chunk eager", "chunk compiled")


def make_inputs(B, T, H, D, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    M = 4 * D

    def r(*s, scale=1.0):
        return (torch.randn(*s, generator=g) * scale).to(device)

    return {
        "q": r(B, H, T, D, scale=0.5).to(dtype),
        "k": r(B, H, T, D, scale=0.5).to(dtype),
        "v": r(B, H, T, D).to(dtype),
        "lr": (torch.rand(B, H, T, generator=g) * 0.1 / D).to(device),
        "ln_weight": 1 + r(H, D, scale=0.1),
        "ln_bias": r(H, D, scale=0.1),
        "W1": r(H, D, M, scale=0.02),
        "b1": torch.zeros(H, M, device=device),
        "W2": r(H, M, D, scale=0.02),
        "b2": torch.zeros(H, D, device=device),
    }


def call(x, impl):
    te = default_token_eta(MB, x["q"].device).float()
    st = (x["W1"], x["b1"], x["W2"], x["b2"])
    return ttt_mlp(
        x["q"],
        x["k"],
        x["v"],
        x["lr"],
        x["ln_weight"],
        x["ln_bias"],
        initial_state=st,
        token_eta=te,
        impl=impl,
    ).output


def with_grad(x):
    return {k: v.detach().requires_grad_() for k, v in x.items()}


def check(x, dtype):
    xs = {k: (v[:1, :2] if k in ("q", "k", "v", "lr") else v[:2]) for k, v in x.items()}
    # seeded: the gate's errors are comparable between runs and dot modes
    g = torch.Generator(device="cpu").manual_seed(0)
    do = torch.randn(xs["q"].shape, generator=g).to(xs["q"].device)

    def run(impl, dt):
        sd = torch.float64 if dt == torch.float64 else torch.float32
        xi = with_grad({k: v.to(dt if k in ("q", "k", "v") else sd) for k, v in xs.items()})
        o = call(xi, impl)
        o.backward(do.to(o.dtype))
        return [o.detach()] + [xi[k].grad for k in ("q", "k", "v", "lr")]

    return gate(run, dtype)


def flops(B, T, H, D, backward):
    """Matmul FLOPs of the dual form (module docstring): forward, or forward + backward."""
    M = 4 * D
    fwd = B * H * T * (14 * D * M + 4 * MB * (D + M))
    return 3 * fwd if backward else fwd


def fwd_bwd(impl, x, do):
    xg = with_grad(x)

    def run():
        for t in xg.values():
            t.grad = None
        call(xg, impl).backward(do)

    return run


def time_path(row, name, impl, mode, x, do, device, quick):
    """Forward (no grad) and forward+backward ms of one path into ``row``; errors are reported."""
    try:
        with mode():
            if name == "chunk compiled":  # compile outside the timing
                t = time.perf_counter()
                with torch.no_grad():
                    call(x, impl)
                fwd_bwd(impl, x, do)()
                if device == "cuda":
                    torch.cuda.synchronize()
                row[f"{name} compile s"] = time.perf_counter() - t
            with torch.no_grad():
                row[f"{name} fwd"] = bench(lambda: call(x, impl), device, quick)
            row[f"{name} fwdbwd"] = bench(fwd_bwd(impl, x, do), device, quick)
    except Exception as err:  # a path that cannot run at this shape is reported, not hidden
        key = f"{name} fwdbwd" if f"{name} fwd" in row else f"{name} fwd"
        row[key] = f"error: {type(err).__name__}: {str(err)[:80]}"
    print(
        f"[{row['shape']}] {name}: {fmt(row.get(name + ' fwd'))} / {fmt(row.get(name + ' fwdbwd'))} ms",
        flush=True,
    )


def run_shape(B, T, H, D, dtype, device, args, emit):
    """Check, then time every path at one shape; ``emit(row)`` after each step writes partial results."""
    x = make_inputs(B, T, H, D, dtype, device)
    row = {"shape": f"{B},{T},{H},{D}", "flops": {m: flops(B, T, H, D, m == "fwdbwd") for m in MODES}}
    passed = {}
    if args.triton:
        checks = []
        for mode in args.dots:
            with dots_mode(mode):
                passed[mode], rep = check(x, dtype)
            checks.append(
                f"{mode or 'default'} dots: " + ("pass " if passed[mode] else "FAIL ") + json.dumps(rep)
            )
        row["check"] = "; ".join(checks)
    else:
        row["check"] = "skipped (no CUDA and no TRITON_INTERPRET=1: Triton not run)"
    print(f"[{row['shape']}] check ours vs chunk fp64: {row['check']}", flush=True)
    emit(row)
    do = torch.randn_like(x["q"])
    paths = {
        ours_name(mode, args.dots): ("triton", lambda m=mode: dots_mode(m), passed.get(mode, False))
        for mode in args.dots
    }
    paths |= {
        "chunk eager": ("chunk", lambda: pytorch_mode(False, args.tf32), not args.skip_eager),
        "chunk compiled": ("chunk", lambda: pytorch_mode(True, args.tf32), not args.skip_compiled),
    }
    for name, (impl, mode, wanted) in paths.items():
        if wanted:
            time_path(row, name, impl, mode, x, do, device, args.quick)
            emit(row)
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


def rate(row, name, mode, peak):
    """Achieved "TFLOP/s (% of peak)" of one timed path."""
    ms = row.get(f"{name} {mode}")
    if not isinstance(ms, float):
        return "-"
    tf = row["flops"][mode] / (ms * 1e-3) / 1e12
    return f"{tf:.3g} ({100 * tf / peak:.3g}%)"


def status(check: str) -> str:
    """One word for the table: FAIL if any dot mode failed its gate, skip, or pass."""
    return "FAIL" if "FAIL" in check else "skip" if check.startswith("skipped") else "pass"


def table(rows, header, peak, dots):
    cols = [ours_name(m, dots) for m in dots] + list(OTHERS)
    lines = list(header)
    for mode in MODES:
        title = "forward" if mode == "fwd" else "forward + backward"
        lines += ["", f"### {title} (ms, median of triton.testing.do_bench)", ""]
        lines.append(
            "| B,T,H,D | check | " + " | ".join(cols) + " | ours vs chunk compiled "
            "| ours TFLOP/s (% of peak) | chunk compiled TFLOP/s (% of peak) |"
        )
        lines.append("|---" * (len(cols) + 5) + "|")
        for r in rows:
            ours, comp = r.get(f"ours {mode}"), r.get(f"chunk compiled {mode}")
            ratio = f"{comp / ours:.2f}x" if isinstance(ours, float) and isinstance(comp, float) else "-"
            vals = " | ".join(fmt(r.get(f"{c} {mode}")) for c in cols)
            lines.append(
                f"| {r['shape']} | {status(r['check'])} | {vals} | {ratio} | {rate(r, 'ours', mode, peak)} "
                f"| {rate(r, 'chunk compiled', mode, peak)} |"
            )
    lines += ["", "chunk compiled, first forward + forward+backward (compilation included), s:", ""]
    lines += [f"- {r['shape']}: {fmt(r.get('chunk compiled compile s'))}" for r in rows]
    lines += ["", "checks (ours vs chunked fp64, max abs err <= budget):", ""]
    lines += [f"- {r['shape']}: {r['check']}" for r in rows]
    return "\n".join(lines) + "\n"


def parse_args():
    ap = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="*", default=None, help="B,T,H,D ... (default: two issue shapes)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--device", default=None, choices=["cuda", "cpu"], help="default: cuda if available")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak of the GPU")
    ap.add_argument("--skip-eager", action="store_true", help="do not time the eager chunked form")
    ap.add_argument("--skip-compiled", action="store_true", help="do not time the compiled chunked form")
    ap.add_argument("--tf32", action="store_true", help="TF32 matmuls in the chunked PyTorch paths")
    ap.add_argument("--quick", action="store_true", help="do_bench with 10 ms warm-up, 50 ms of repeats")
    ap.add_argument("--out", default=None, help="markdown file to write (rewritten after every step)")
    ap.add_argument(
        "--dots",
        nargs="*",
        default=[None],
        help="TTT_TRITON_DOTS modes of our kernel to check and time (tf32, input; default: the default); "
        "the first is the 'ours' column",
    )
    return ap.parse()


def main():
    args = parse_args()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    shapes = [tuple(int(s) for s in sh.split(",")) for sh in args.shapes] if args.shapes else SHAPES
    args.triton = device == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    raise_recompile_limit(64)
    gpu = torch.cuda.get_device_name() if device == "cuda" else "CPU (not a timing)"
    header = [
        f"# TTT-MLP kernels: {gpu}",
        "",
        f"torch {torch.__version__}, dtype {args.dtype}, mini-batch {MB}, M = 4 D, causal. "
        f"Command: `python benchmarks/kernels_ttt_mlp.py {' '.join(sys.argv[1:])}`",
        'chunk compiled = `impl="chunk"` with `ttt.ops.compile_chunk_steps()` (its `dual_segment` compiled '
        f"once, timed after a compiling warm-up). Chunked PyTorch matmuls: {'TF32' if args.tf32 else 'full fp32'}.",
        "fwd is timed under torch.no_grad(); fwd+bwd = forward + o.backward(do). ours vs X = t_X / t_ours. "
        f"TFLOP/s: matmul FLOPs of the dual form (script docstring) / time; peak {args.peak_tflops:g} TFLOP/s. "
        f"Dot operands of our kernel (TTT_TRITON_DOTS): {', '.join(m or 'default' for m in args.dots)}.",
    ]
    rows = []

    def emit(row):
        if not rows or rows[-1] is not row:
            rows.append(row)
        write_out(args.out, table(rows, header, args.peak_tflops, args.dots),
                  {"gpu": gpu, "peak_tflops": args.peak_tflops, "rows": rows})  # fmt: skip

    for B, T, H, D in shapes:
        run_shape(B, T, H, D, dtype, device, args, emit)
    print(table(rows, header, args.peak_tflops, args.dots), flush=True)
    return 0 if not any("FAIL" in r["check"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
