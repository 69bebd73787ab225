"""Per-token decode latency: the fused TTT-Linear / TTT-MLP decode kernels vs SDPA with a KV cache.

One decode step for every (batch, head), B = 8, H = 16, D = 64 (TTT-MLP: M = 256), bf16 inputs, fp32
state. Rows:

- ``ttt_linear op`` / ``ttt_mlp op``: the public op with T = 1 (``impl="triton", decode=True``, validation and
  ``TTTState`` bookkeeping on the host, one kernel launch; new state tensors every step);
- ``ttt_linear step`` / ``ttt_mlp step``: the in-place kernel call ``ttt_linear_decode_`` (eager);
- ``... graph``: the in-place step captured in a CUDA graph and replayed (what a compiled decode
  loop pays: no Python, no launch overhead beyond the graph's);
- ``sdpa L``: ``F.scaled_dot_product_attention`` of one query against a bf16 KV cache of L tokens
  (FlashAttention / efficient backend chosen by PyTorch), eager and graph-replayed.

Timings are medians of ``triton.testing.do_bench`` (it clears the L2 cache before each run, so a
state that would be evicted by the other layers of a model is read from HBM). The TTT rows do not
depend on the context length; SDPA reads the whole cache.

    python benchmarks/kernels_decode.py [--contexts 1024 4096 16384 65536] [--out results.md]
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():  # a CPU smoke run: the kernels go through Triton's interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

sys.path.insert(0, os.path.dirname(__file__))

from _harness import bench  # noqa: E402

from ttt.ops import ttt_linear, ttt_mlp  # noqa: E402
from ttt.ops.common import default_token_eta  # noqa: E402
from ttt.ops.ttt_linear.triton.decode import ttt_linear_decode_  # noqa: E402
from ttt.ops.ttt_mlp.triton.decode import ttt_mlp_decode_  # noqa: E402
from ttt.recipes.args import Parser


def graphed(fn):
    """Capture ``fn`` (after a warm-up on a side stream) and return a replay closure."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def ttt_inputs(B, H, D, M, dtype, device):
    g = torch.Generator().manual_seed(0)
    r = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(device)  # noqa: E731
    tok = [r(B, H, D, scale=0.5).to(dtype) for _ in range(3)] + [
        (torch.rand(B, H, generator=g) / D).to(device)
    ]
    ln = (1 + r(H, D, scale=0.1), r(H, D, scale=0.1))
    te = default_token_eta(16, device).float()
    lin = (r(B, H, D, D, scale=0.02), torch.zeros(B, H, D, device=device))
    mlp = (r(B, H, D, M, scale=0.02), torch.zeros(B, H, M, device=device), r(B, H, M, D, scale=0.02),
           torch.zeros(B, H, D, device=device))  # fmt: skip
    return tok, ln, te, lin, mlp


def ttt_rows(B, H, D, M, dtype, device, quick):
    tok, (lw, lb), te, lin, mlp = ttt_inputs(B, H, D, M, dtype, device)
    rows = {}
    for name, op, step_, anchor in (
        ("ttt_linear", ttt_linear, ttt_linear_decode_, lin),
        ("ttt_mlp", ttt_mlp, ttt_mlp_decode_, mlp),
    ):
        q4, k4, v4, lr3 = (t[:, :, None] for t in tok)
        state = {"s": anchor}

        def op_call(op=op, state=state, q4=q4, k4=k4, v4=v4, lr3=lr3):
            with torch.no_grad():
                _, state["s"] = op(q4, k4, v4, lr3, lw, lb, initial_state=state["s"], token_eta=te,
                                   output_final_state=True, impl="triton", decode=True)  # fmt: skip

        rows[f"{name} op"] = bench(op_call, device, quick)
        a = tuple(t.clone() for t in anchor)
        s = tuple(torch.zeros_like(t) for t in anchor)
        off = torch.zeros(B, H, dtype=torch.int32, device=device)
        out = torch.empty(B, H, D, dtype=dtype, device=device)

        def step_call(step_=step_, a=a, s=s, off=off, out=out):
            step_(*tok, lw, lb, te, a, s, off, out=out)

        rows[f"{name} step"] = bench(step_call, device, quick)
        if device == "cuda":
            rows[f"{name} graph"] = bench(graphed(step_call), device, quick)
        print(
            f"[decode] {name}: " + ", ".join(f"{k} {v:.4f} ms" for k, v in rows.items() if name in k),
            flush=True,
        )
    return rows


def sdpa_rows(B, H, D, contexts, dtype, device, quick):
    rows = {}
    for L in contexts:
        q = torch.randn(B, H, 1, D, device=device, dtype=dtype)
        k = torch.randn(B, H, L, D, device=device, dtype=dtype)
        v = torch.randn_like(k)
        out = {}

        def call(q=q, k=k, v=v, out=out):
            out["o"] = F.scaled_dot_product_attention(q, k, v)

        eager = bench(call, device, quick)
        graph = bench(graphed(call), device, quick) if device == "cuda" else float("nan")
        rows[L] = (eager, graph)
        print(f"[decode] sdpa L={L}: eager {eager:.4f} ms, graph {graph:.4f} ms", flush=True)
        del k, v
    return rows


def main() -> None:
    ap = Parser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", nargs="*", type=int, default=[1024, 4096, 16384, 65536])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--quick", action="store_true", help="shorter do_bench windows")
    ap.add_argument("--out", default=None)
    args = ap.parse()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    B, H, D = args.batch, args.heads, args.head_dim
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (Triton interpreter)"
    ttt = ttt_rows(B, H, D, 4 * D, dtype, device, args.quick)
    sdpa = sdpa_rows(B, H, D, args.contexts, dtype, device, args.quick)
    lines = [
        f"# Decode latency: {name}",
        "",
        f"torch {torch.__version__}, {dtype}, B = {B}, H = {H}, D = {D}, TTT-MLP M = {4 * D}, mini-batch 16.",
        "Command: `python benchmarks/kernels_decode.py" + (" --quick" if args.quick else "") + "`",
        "ms per decode step (median of triton.testing.do_bench, L2 cleared before each run).",
        "",
        "| path | ms per token |",
        "|---|---|",
        *(f"| {k} | {v:.4f} |" for k, v in ttt.items()),
        "",
        "| KV length | sdpa eager | sdpa graph | ttt_linear graph / sdpa graph | ttt_mlp graph / sdpa graph |",
        "|---|---|---|---|---|",
    ]
    lin_g, mlp_g = ttt.get("ttt_linear graph", float("nan")), ttt.get("ttt_mlp graph", float("nan"))
    for L, (e, gr) in sdpa.items():
        lines.append(f"| {L} | {e:.4f} | {gr:.4f} | {lin_g / gr:.2f}x | {mlp_g / gr:.2f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
