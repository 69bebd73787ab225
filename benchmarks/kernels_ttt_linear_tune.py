"""Kernel-level timings of the TTT-Linear Triton launchers: dot operand precision (``TTT_TRITON_DOTS``),
warps per program, anchor checkpointing on/off, backward and its parallel stage. Used to pick the defaults in ``ttt/ops/ttt_linear/triton``.

    python benchmarks/kernels_ttt_linear_tune.py [--shapes B,T,H,D ...] [--dots tf32 input] [--warps 2 4 8]
        [--stages 2] [--out results.md]
"""

from __future__ import annotations

import os
import sys
import time
from functools import partial

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from ttt.ops.common import default_token_eta  # noqa: E402
from ttt.ops.ttt_linear.triton.chunk_bwd import chunk_ttt_linear_bwd, chunk_ttt_linear_bwd_local  # noqa: E402
from ttt.ops.ttt_linear.triton.chunk_fwd import chunk_ttt_linear_fwd_fused  # noqa: E402
from ttt.recipes.args import Parser

SHAPES = [(8, 2048, 16, 64), (4, 8192, 16, 64), (2, 16384, 16, 128)]


def main():
    ap = Parser()
    ap.add_argument("--shapes", nargs="*", default=None)
    ap.add_argument("--warps", nargs="*", type=int, default=[2, 4, 8])
    ap.add_argument("--stages", nargs="*", type=int, default=[2])
    ap.add_argument("--dots", nargs="*", default=["tf32", "input"], help="TTT_TRITON_DOTS modes to compare")
    ap.add_argument("--local-maxnreg", nargs="*", type=int, default=[0], help="register caps (0: none)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--out", default=None)
    args = ap.parse()
    import triton

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = torch.cuda.get_device_name() if dev == "cuda" else "CPU (TRITON_INTERPRET=1, not a timing)"
    shapes = [tuple(int(s) for s in sh.split(",")) for sh in args.shapes] if args.shapes else SHAPES
    lines = [f"# TTT-Linear kernel variants: {gpu} ({args.dtype}, b = 16, causal)", ""]
    lines += ["| B,T,H,D | variant | dots warps/stages | ms |", "|---|---|---|---|"]
    fwd_variants = [
        ("fwd fused", dict(store_ckpt=False)),
        ("fwd fused + ckpt", dict(store_ckpt=True)),
    ]
    for B, T, H, D in shapes:
        g = torch.Generator(device="cpu").manual_seed(0)
        q, k, v = (
            (torch.randn(B, H, T, D, generator=g) * 0.5).to(dev, getattr(torch, args.dtype)) for _ in range(3)
        )
        lr = (torch.rand(B, H, T, generator=g) / D).to(dev)
        lw, lb = torch.ones(H, D, device=dev), torch.zeros(H, D, device=dev)
        te = default_token_eta(16, dev).float()
        h0 = ((torch.randn(B, H, D, D, generator=g) * 0.02).to(dev), torch.zeros(B, H, D, device=dev))
        g0 = (torch.zeros(B, H, D, D, device=dev), torch.zeros(B, H, D, device=dev))
        do = torch.randn_like(q)
        common = dict(offset=0, causal=True, eps=1e-6)
        fwd_args = (q, k, v, lr, te, lw, lb, h0, g0)
        ref = chunk_ttt_linear_fwd_fused(*fwd_args, store_ckpt=False, **common)[0]
        variants = []
        for dots in args.dots:
            # checkpoints written in this dot mode (their dtype tells the backward how to round)
            os.environ["TTT_TRITON_DOTS"] = dots
            ckpt = chunk_ttt_linear_fwd_fused(*fwd_args, store_ckpt=True, **common)[3]
            bwd_args = (q, k, v, lr, te, lw, lb, ckpt, g0, do, g0, g0)
            for w in args.warps:
                for st in args.stages:
                    cfg = f"{dots} {w}/{st}"
                    for name, kw in fwd_variants:
                        fn = partial(
                            chunk_ttt_linear_fwd_fused, *fwd_args, num_warps=w, num_stages=st, **kw, **common
                        )
                        variants.append((name, cfg, dots, fn))
                    fn = partial(chunk_ttt_linear_bwd, *bwd_args, num_warps=w, num_stages=st, **common)
                    # warps / stages apply to the sequential kernel; the parallel stage keeps its own
                    variants.append(("bwd (local + seq; warps/stages of seq)", cfg, dots, fn))
            # the parallel stage alone (bwd - this = the sequential sweep), at its default warps and
            # with a register cap that lets more programs share an SM (0: none; the launcher's default
            # caps at LOCAL_MAXNREG under bf16 dots at D <= 64)
            for cap in args.local_maxnreg:
                fn = partial(chunk_ttt_linear_bwd_local, *bwd_args[:10], maxnreg=cap, **common)
                variants.append((f"bwd local stage, maxnreg {cap or '-'}", f"{dots} -/-", dots, fn))
        for name, w, dots, fn in variants:
            os.environ["TTT_TRITON_DOTS"] = dots  # read by every launch (ttt/ops/ttt_linear/triton/dot.py)
            try:
                out = fn()
                if name.startswith("fwd"):
                    err = (out[0].float() - ref.float()).abs().max().item()
                    assert err < 0.1, f"{name} w{w} differs from the fused forward by {err}"
                if dev == "cuda":
                    ms = triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")
                else:
                    t0 = time.perf_counter()
                    fn()
                    ms = (time.perf_counter() - t0) * 1e3
                cell = f"{ms:.3f}"
            except Exception as err:  # an out-of-resources config is reported, not fatal
                cell = f"error: {type(err).__name__}: {str(err)[:60]}"
            lines.append(f"| {B},{T},{H},{D} | {name} | {w} | {cell} |")
            print(lines[-1], flush=True)
        if dev == "cuda":
            torch.cuda.empty_cache()
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
