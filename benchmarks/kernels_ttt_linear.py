"""Benchmark the fused Triton TTT-Linear against our chunked PyTorch form (eager, and with its loop bodies
compiled by ``ttt.ops.compile_chunk_steps``), SDPA (FlashAttention) and flash-linear-attention's
``chunk_ttt_linear``; forward and forward+backward, bf16, mini-batch 16.

Every timed path is first checked: ours against the chunked form in float64 (output and the gradients
of q, k, v, lr on a slice of the batch), with the R13 budget err(ours) <= 2 * (err(chunk in the bench
dtype) + eps * max|ref|). A path that fails its check is not timed. fla computes a different function
(its output is z + LN(z), q scaled, row-wise eta), so it is timed, not compared.

    python benchmarks/kernels_ttt_linear.py                       # the three issue shapes
    python benchmarks/kernels_ttt_linear.py --shapes 1,256,2,64   # a quick one
    python benchmarks/kernels_ttt_linear.py --out benchmarks/results/kernels_ttt_linear_h200.md
    python benchmarks/kernels_ttt_linear.py --quick --no-fla --decode --out /tmp/lin.md  # a tight budget
    python benchmarks/kernels_ttt_linear.py --device cpu --shapes 1,64,2,16 --decode    # CPU smoke test
    python benchmarks/kernels_ttt_linear.py --dots auto tf32 --skip-eager --skip-compiled  # dot modes side by side

"chunk compiled" is the chunked form with its per-mini-batch loop bodies compiled once
(``dynamic=False``); its first forward and forward+backward run outside the timing and compile it (the
"compile s" column). ``--tf32`` lets the chunked PyTorch paths use TF32 matmuls (the kernels' dot
operands: ``--dots``, ttt/ops/ttt_linear/triton/dot.py); the correctness gate always runs at full fp32 precision. On CPU (no CUDA) the
Triton path runs only under ``TRITON_INTERPRET=1`` and every time is one call, not a benchmark.

Writes a markdown table (device named) to ``--out`` after every measurement, so a run that is stopped
leaves its partial results, and prints it at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F

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

from ttt.ops import ttt_linear  # noqa: E402
from ttt.ops.common import default_token_eta  # noqa: E402
from ttt.recipes.args import Parser

SHAPES = [(8, 2048, 16, 64), (4, 8192, 16, 64), (2, 16384, 16, 128)]


def make_inputs(B, T, H, D, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)

    def r(*s, scale=1.0):
        return (torch.randn(*s, generator=g) * scale).to(device)

    x = {
        "q": r(B, H, T, D, scale=0.5).to(dtype),
        "k": r(B, H, T, D, scale=0.5).to(dtype),
        "v": r(B, H, T, D).to(dtype),
        # lr ~ base_lr * sigmoid(.) / D, as the TTT layer's gate
        "lr": (torch.rand(B, H, T, generator=g) / D).to(device),
        "ln_weight": 1 + r(H, D, scale=0.1),
        "ln_bias": r(H, D, scale=0.1),
        "W0": r(H, D, D, scale=0.02),
        "b0": torch.zeros(H, D, device=device),
    }
    return x


def ours_call(x, impl, mb=16, causal=True):
    te = default_token_eta(mb, x["q"].device).float()
    return ttt_linear(
        x["q"],
        x["k"],
        x["v"],
        x["lr"],
        x["ln_weight"],
        x["ln_bias"],
        initial_state=(x["W0"], x["b0"]),
        token_eta=te,
        mini_batch_size=mb,
        causal=causal,
        impl=impl,
    ).output


def with_grad(x, keys=("q", "k", "v", "lr", "ln_weight", "ln_bias", "W0", "b0")):
    return {k: (v.detach().requires_grad_() if k in keys else v) for k, v in x.items()}


# ------------------------------------------------------------------------------------------- checks


def check_ours(x, dtype, slice_bh=(1, 2)):
    """Our kernel vs the chunked form in fp64 on a [:1, :2] slice: output and grads of q, k, v, lr."""
    b, h = slice_bh
    xs = {k: (v[:b, :h] if v.dim() >= 3 and k in ("q", "k", "v", "lr") else v) for k, v in x.items()}
    xs = {k: (v[:h] if k in ("ln_weight", "ln_bias", "W0", "b0") else v) for k, v in xs.items()}
    # seeded: the gate's errors are comparable between runs and dot modes
    g = torch.Generator(device="cpu").manual_seed(0)
    do = torch.randn(xs["q"].shape, generator=g).to(xs["q"].device)

    def run(impl, dt):
        sd = torch.float64 if dt == torch.float64 else torch.float32
        xi = with_grad({k: v.to(dt if k in ("q", "k", "v") else sd) for k, v in xs.items()})
        o = ours_call(xi, impl)
        o.backward(do.to(o.dtype))
        return [o.detach()] + [xi[k].grad for k in ("q", "k", "v", "lr")]

    return gate(run, dtype)


# ------------------------------------------------------------------------------------------- timing


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def warm_up(call, x, do, device):
    """One forward and one forward+backward outside the timing (compiles); returns their seconds."""
    t = time.perf_counter()
    with torch.no_grad():
        call(x)
    fwd_bwd(call, x, do)()
    sync(device)
    return time.perf_counter() - t


def fwd_bwd(call, x, do):
    xg = with_grad(x)

    def run():
        for v in xg.values():
            v.grad = None
        o = call(xg)
        o.backward(do)

    return run


def fla_call(xt):
    from fla.ops.ttt import chunk_ttt_linear

    return chunk_ttt_linear(
        xt["q"],
        xt["k"],
        xt["v"],
        xt["ln_weight"],
        xt["ln_bias"],
        xt["lr"],
        chunk_size=16,
        initial_state=xt["W0"],
        initial_state_bias=xt["b0"],
        output_final_state=False,
    )[0]


def fla_inputs(x):
    """fla takes [B, T, H, D], eta [B, T, H, 1], W0 [B, H, D, D], b0 [B, H, 1, D]."""
    B, H, T, D = x["q"].shape
    t = {k: x[k].transpose(1, 2).contiguous() for k in ("q", "k", "v")}
    t["lr"] = x["lr"].to(x["q"].dtype).transpose(1, 2)[..., None].contiguous()
    t["ln_weight"], t["ln_bias"] = x["ln_weight"].to(x["q"].dtype), x["ln_bias"].to(x["q"].dtype)
    t["W0"] = x["W0"][None].expand(B, H, D, D).float().contiguous()
    t["b0"] = x["b0"][None, :, None].expand(B, H, 1, D).float().contiguous()
    return t


def sdpa_call(x):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(x["q"], x["k"], x["v"], is_causal=True)


def chunk_call(xx):
    return ours_call(xx, "chunk")


def timed_paths(T, device, args, ok):
    """``{name: (call, context factory)}`` of the paths to time at this shape; ``ok``: the dot modes
    whose check passed."""
    paths = {}
    for mode in ok:
        paths[ours_name(mode, args.dots)] = (lambda xx: ours_call(xx, "triton"), lambda m=mode: dots_mode(m))
    if not args.skip_eager and T <= args.eager_max_t:
        paths["chunk eager"] = (chunk_call, lambda: pytorch_mode(False, args.tf32))
    if not args.skip_compiled:
        paths["chunk compiled"] = (chunk_call, lambda: pytorch_mode(True, args.tf32))
    if device == "cuda":
        paths["sdpa flash"] = (sdpa_call, contextlib.nullcontext)
    return paths


def time_path(row, name, call, mode, x, do, device, args):
    """Forward (no grad) and forward+backward times of one path into ``row``; errors are reported."""
    try:
        with mode():
            if name == "chunk compiled":
                row[f"{name} compile s"] = warm_up(call, x, do, device)
            with torch.no_grad():
                row[f"{name} fwd"] = bench(lambda: call(x), device, args.quick)
            row[f"{name} fwdbwd"] = bench(fwd_bwd(call, x, do), device, args.quick)
    except Exception as err:  # a path that cannot run at this shape is reported, not hidden
        key = f"{name} fwdbwd" if f"{name} fwd" in row else f"{name} fwd"
        row[key] = f"error: {type(err).__name__}: {str(err)[:80]}"
    print(
        f"[{row['shape']}] {name}: {fmt(row.get(name + ' fwd'))} / {fmt(row.get(name + ' fwdbwd'))} ms",
        flush=True,
    )


def run_fla(row, x, do, device, args):
    try:
        xt = fla_inputs(x)
        with torch.no_grad():
            o = fla_call(xt)
        assert torch.isfinite(o).all(), "fla output not finite"
        with torch.no_grad():
            row["fla fwd"] = bench(lambda: fla_call(xt), device, args.quick)
        row["fla fwdbwd"] = bench(fwd_bwd(fla_call, xt, do.transpose(1, 2).contiguous()), device, args.quick)
    except Exception as err:
        row["fla fwd"] = f"error: {type(err).__name__}: {str(err)[:120]}"
    print(f"[{row['shape']}] fla: {row.get('fla fwd')} / {row.get('fla fwdbwd')} ms", flush=True)


def run_shape(B, T, H, D, dtype, device, args, emit):
    """Check, then time every path at one shape; ``emit(row)`` after each step writes partial results."""
    x = make_inputs(B, T, H, D, dtype, device)
    row = {"shape": f"{B},{T},{H},{D}"}
    ok = []
    if args.triton:
        checks = []
        for mode in args.dots:
            with dots_mode(mode):
                passed, rep = check_ours(x, dtype)
            ok += [mode] if passed else []
            checks.append(f"{mode or 'default'} dots: " + ("pass " if passed else "FAIL ") + json.dumps(rep))
        row["check"] = "; ".join(checks)
    else:
        row["check"] = "skipped (no CUDA and no TRITON_INTERPRET=1: Triton not run)"
    print(f"[{row['shape']}] check ours vs chunk fp64: {row['check']}", flush=True)
    emit(row)
    do = torch.randn_like(x["q"])
    for name, (call, mode) in timed_paths(T, device, args, ok).items():
        time_path(row, name, call, mode, x, do, device, args)
        emit(row)
    if args.fla:
        run_fla(row, x, do, device, args)
        emit(row)
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


def run_decode(contexts, B, H, D, dtype, device, quick=False):
    """Per-token latency of one decode step: ours (T = 1 through the public op, state carried) vs SDPA
    over a KV cache of ``L`` tokens (FlashAttention backend, one query)."""
    from ttt.ops import TTTState

    g = torch.Generator(device="cpu").manual_seed(1)
    q1, k1, v1 = ((torch.randn(B, H, 1, D, generator=g) * 0.5).to(device, dtype) for _ in range(3))
    lr1 = (torch.rand(B, H, 1, generator=g) / D).to(device)
    lw, lb = torch.ones(H, D, device=device), torch.zeros(H, D, device=device)
    te = default_token_eta(16, device).float()
    rows = []
    for L in contexts:
        W = (torch.randn(B, H, D, D, generator=g) * 0.02).to(device)
        b = torch.zeros(B, H, D, device=device)
        gs = (torch.randn(B, H, D, D, generator=g) * 1e-3).to(device), torch.zeros(B, H, D, device=device)
        off = L % 16
        st = TTTState((W, b), (W, b), gs, off, 16, "ttt_linear")

        def ours(st=st):
            return ttt_linear(
                q1,
                k1,
                v1,
                lr1,
                lw,
                lb,
                initial_state=st,
                token_eta=te,
                output_final_state=True,
                impl="triton",
                decode=True,
            )

        row = {"L": L}
        with torch.no_grad():
            row["ours"] = bench(ours, device, quick)
            if device == "cuda":
                from torch.nn.attention import SDPBackend, sdpa_kernel

                kc, vc = ((torch.randn(B, H, L, D, generator=g) * 0.5).to(device, dtype) for _ in range(2))

                def sdpa(kc=kc, vc=vc):
                    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                        return F.scaled_dot_product_attention(q1, kc, vc)

                row["sdpa"] = bench(sdpa, device, quick)
        rows.append(row)
        print(
            f"[decode L={L}] ours {row['ours']:.4f} ms, sdpa {row.get('sdpa', float('nan')):.4f} ms",
            flush=True,
        )
    return rows


def speedup(ours, other):
    """``t_other / t_ours`` as "1.23x" (how many times faster ours is), or "-" when either is missing."""
    return f"{other / ours:.2f}x" if isinstance(ours, float) and isinstance(other, float) else "-"


def table(rows, header_lines, args):
    extra = [ours_name(m, args.dots) for m in args.dots[1:]]
    cols = ["ours", *extra, "fla", "chunk eager", "chunk compiled", "sdpa flash"]
    versus = [("ours", "fla"), ("ours", "sdpa flash"), ("ours", "chunk compiled")]
    versus += [(e, c) for e in extra for c in ("fla", "sdpa flash")]
    lines = list(header_lines)
    for mode in ("fwd", "fwdbwd"):
        lines += ["", f"### {mode} (ms, median of triton.testing.do_bench)", ""]
        lines.append(
            "| B,T,H,D | " + " | ".join(cols) + " | " + " | ".join(f"{a} vs {c}" for a, c in versus) + " |"
        )
        lines.append("|---" * (len(cols) + len(versus) + 1) + "|")
        for r in rows:
            vals = " | ".join(fmt(r.get(f"{c} {mode}")) for c in cols)
            ratios = " | ".join(speedup(r.get(f"{a} {mode}"), r.get(f"{c} {mode}")) for a, c in versus)
            lines.append(f"| {r['shape']} | {vals} | {ratios} |")
    lines += ["", "### chunk compiled: first forward + forward+backward (compilation included), s", ""]
    lines += [f"- {r['shape']}: {fmt(r.get('chunk compiled compile s'))}" for r in rows]
    lines += ["", "### correctness gate (ours vs chunked fp64, max abs err <= budget)", ""]
    lines += [f"- {r['shape']}: {r['check']}" for r in rows]
    return "\n".join(lines) + "\n"


def decode_table(dec):
    text = "\n### decode: one token, B = 8, H = 16, D = 64 (ms per step; ours = the public op with T = 1)\n\n"
    text += "| KV length | ours | sdpa flash (KV cache) |\n|---|---|---|\n"
    return text + "".join(f"| {r['L']} | {fmt(r['ours'])} | {fmt(r.get('sdpa'))} |\n" for r in dec)


def parse_args():
    ap = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--shapes", nargs="*", default=None, help="B,T,H,D ... (default: the three reference shapes)"
    )
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--device", default=None, choices=["cuda", "cpu"], help="default: cuda if available")
    ap.add_argument("--no-fla", dest="fla", action="store_false", help="skip flash-linear-attention")
    ap.add_argument("--eager-max-t", type=int, default=1 << 30, help="skip chunk eager above this T")
    ap.add_argument("--skip-eager", action="store_true", help="do not time the eager chunked form")
    ap.add_argument("--skip-compiled", action="store_true", help="do not time the compiled chunked form")
    ap.add_argument("--tf32", action="store_true", help="TF32 matmuls in the chunked PyTorch paths")
    ap.add_argument("--quick", action="store_true", help="do_bench with 10 ms warm-up, 50 ms of repeats")
    ap.add_argument("--out", default=None, help="markdown file to write (rewritten after every step)")
    ap.add_argument(
        "--dots",
        nargs="*",
        default=[None],
        help="TTT_TRITON_DOTS modes of our kernels to check and time (tf32, input; default: the default); "
        "the first is the 'ours' column",
    )
    ap.add_argument(
        "--decode", nargs="*", type=int, default=[1024, 4096, 16384, 65536], help="KV lengths (none: skip)"
    )
    return ap.parse()


def main():
    args = parse_args()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    shapes = [tuple(int(s) for s in sh.split(",")) for sh in args.shapes] if args.shapes else SHAPES
    args.triton = device == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    args.fla = args.fla and device == "cuda"
    raise_recompile_limit(64)
    gpu = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({platform.processor() or 'unknown'})"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "absent"
    header = [
        f"# TTT-Linear kernels: {gpu}",
        "",
        f"torch {torch.__version__}, triton {triton_version}, dtype {args.dtype}, mini-batch 16, causal, "
        f"W0 ~ N(0, 0.02), lr ~ U(0, 1/D).",
        f"Command: `python benchmarks/kernels_ttt_linear.py {' '.join(sys.argv[1:])}`",
        "fla = flash-linear-attention 0.6.0 `chunk_ttt_linear` (different function, timed only; "
        "inputs pre-transposed to [B, T, H, D] outside the timed region). "
        "sdpa flash = F.scaled_dot_product_attention(is_causal=True) on the FlashAttention backend.",
        'chunk compiled = `impl="chunk"` with `ttt.ops.compile_chunk_steps()` (loop bodies compiled once, '
        f"timed after a compiling warm-up). Chunked PyTorch matmuls: {'TF32' if args.tf32 else 'full fp32'}.",
        "fwd is timed under torch.no_grad(); fwdbwd = forward + o.backward(do). ours vs X = t_X / t_ours. "
        f"Dot operands of our kernels (TTT_TRITON_DOTS): {', '.join(m or 'default' for m in args.dots)}.",
    ]
    rows = []

    def emit(row):
        if not rows or rows[-1] is not row:
            rows.append(row)
        write_out(args.out, table(rows, header, args), {"gpu": gpu, "rows": rows})

    for B, T, H, D in shapes:
        run_shape(B, T, H, D, dtype, device, args, emit)
    text = table(rows, header, args)
    if args.decode and args.triton:
        dec = run_decode(args.decode, 8, 16, 64, dtype, device, args.quick)
        text += decode_table(dec)
        write_out(args.out, text, {"gpu": gpu, "rows": rows, "decode": dec})
    print(text, flush=True)
    return 0 if not any("FAIL" in r["check"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
