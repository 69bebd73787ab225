"""Benchmark Triton TTT-MLP (fused forward kernel; backward = per-mini-batch recompute in PyTorch) against
the chunked PyTorch form, forward and forward+backward, bf16, mini-batch 16, hidden M = 4 D.

Each shape is first checked: ours vs the chunked form in float64 on a [1, 2] slice of the batch (output and
grads of q, k, v, lr) with the R13 budget. The forward's arithmetic rate is reported against the GPU's bf16
dense peak given with ``--peak-tflops`` (default 989, the H100/H200 SXM datasheet figure).

    python benchmarks/kernels_ttt_mlp.py [--shapes B,T,H,D ...] [--out results.md]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from ttt.ops import ttt_mlp  # noqa: E402
from ttt.ops.common import default_token_eta  # noqa: E402

SHAPES = [(8, 2048, 16, 64), (4, 8192, 16, 64)]


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
    te = default_token_eta(16, x["q"].device).float()
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
    do = torch.randn_like(xs["q"], dtype=torch.float32)
    res = {}
    for name, impl, dt in (
        ("ref", "chunk", torch.float64),
        ("low", "chunk", dtype),
        ("ours", "triton", dtype),
    ):
        sd = torch.float64 if dt == torch.float64 else torch.float32
        xi = with_grad({k: v.to(dt if k in ("q", "k", "v") else sd) for k, v in xs.items()})
        o = call(xi, impl)
        o.backward(do.to(o.dtype))
        res[name] = [o.detach()] + [xi[k].grad for k in ("q", "k", "v", "lr")]
    ok, rep = True, {}
    for i, nm in enumerate(("o", "dq", "dk", "dv", "dlr")):
        ref, low, got = (res[n][i].double() for n in ("ref", "low", "ours"))
        err = (got - ref).abs().max().item()
        bound = 2 * ((low - ref).abs().max().item() + torch.finfo(dtype).eps * ref.abs().max().item())
        rep[nm] = f"{err:.2e}<={bound:.2e}"
        ok &= bool(torch.isfinite(got).all()) and err <= bound
    return ok, rep


def bench(fn, device):
    if device == "cuda":
        import triton

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="*", default=None)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    shapes = [tuple(int(s) for s in sh.split(",")) for sh in args.shapes] if args.shapes else SHAPES
    gpu = torch.cuda.get_device_name() if device == "cuda" else "CPU (TRITON_INTERPRET=1; not a timing)"
    lines = [
        f"# TTT-MLP kernels: {gpu}",
        "",
        f"torch {torch.__version__}, dtype {args.dtype}, mini-batch 16, M = 4 D, causal. "
        f"Command: `python benchmarks/kernels_ttt_mlp.py {' '.join(sys.argv[1:])}`",
        "",
        "| B,T,H,D | check | ours fwd | chunk fwd | ours fwd TFLOP/s (% of peak) | ours fwd+bwd | chunk fwd+bwd |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = []
    for B, T, H, D in shapes:
        x = make_inputs(B, T, H, D, dtype, device)
        ok, rep = check(x, dtype)
        do = torch.randn_like(x["q"])
        row = {"shape": f"{B},{T},{H},{D}", "check": ("pass " if ok else "FAIL ") + json.dumps(rep)}
        print(row, flush=True)
        for name, impl in (("ours", "triton"), ("chunk", "chunk")):
            if name == "ours" and not ok:
                continue
            with torch.no_grad():
                row[f"{name} fwd"] = bench(lambda impl=impl, x=x: call(x, impl), device)
            xg = with_grad(x)

            def fb(impl=impl, xg=xg, do=do):
                for t in xg.values():
                    t.grad = None
                call(xg, impl).backward(do)

            row[f"{name} fwdbwd"] = bench(fb, device)
            print(row, flush=True)
        M = 4 * D
        flops = B * H * T * (14 * D * M + 4 * 16 * (M + D))
        tf = flops / (row["ours fwd"] * 1e-3) / 1e12 if "ours fwd" in row else float("nan")
        cell = lambda k, row=row: f"{row[k]:.3f}" if k in row else "-"  # noqa: E731
        lines.append(
            f"| {row['shape']} | {row['check'][:4]} | {cell('ours fwd')} | {cell('chunk fwd')} | "
            f"{tf:.1f} ({100 * tf / args.peak_tflops:.1f}%) | {cell('ours fwdbwd')} | {cell('chunk fwdbwd')} |"
        )
        rows.append(row)
    lines += ["", "checks (ours vs chunked fp64, max abs err <= budget):", ""]
    lines += [f"- {r['shape']}: {r['check']}" for r in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0 if all(r["check"].startswith("pass") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
