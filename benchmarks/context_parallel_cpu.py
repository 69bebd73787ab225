"""Context parallelism on CPU with gloo: step time against R and bytes sent per step.

For each scheme -- TTT-Linear's state relay (``cp_ttt``), Gated DeltaNet's scan of affine maps
(``cp_family``) and attention's all-gathered keys/values (``cp_attention``) -- and R ranks, one step is
the op's forward and backward on each rank's T/R tokens (plus what the scheme exchanges). Every rank
has one intra-op thread. Bytes are the busiest rank's, counted by ``ttt.distributed.COUNTER`` around
the very calls that ran, and computed by ``ttt.distributed.cp_bytes``; both are written.

At lengths where the step is not timed (``--bytes-T``), the bytes are still counted by running the
exchange alone: the relay sends one state whatever T is, the scan one map per rank, attention
all-gathers K and V (``all_gather`` of ``[2, B, H, T/R, D]`` and its backward).

    python benchmarks/context_parallel_cpu.py --ranks 1 2 4 --time-T 8192 16384 32768 --attention-time-T 8192 \
        --bytes-T 8192 16384 32768 65536
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ttt.ops.family as fam  # noqa: E402
from ttt.distributed import COUNTER, all_gather, cp_attention, cp_bytes, cp_family, cp_ttt, spawn  # noqa: E402
from ttt.ops import ttt_linear  # noqa: E402
from ttt.recipes.args import Parser

SCHEMES = {"ttt_linear": "relay", "gated_deltanet": "scan", "attention": "kv"}


def _inputs(name: str, B: int, H: int, T_r: int, D: int, seed: int, micro_batches: int = 1):
    g = torch.Generator().manual_seed(seed)
    n = lambda *s: torch.randn(*s, generator=g).requires_grad_()  # noqa: E731
    q, k, v = n(B, H, T_r, D), F.normalize(torch.randn(B, H, T_r, D, generator=g), dim=-1), n(B, H, T_r, D)
    k.requires_grad_()
    if name == "ttt_linear":
        lr = torch.full((B, H, T_r), 0.1)
        init = (0.02 * torch.randn(H, D, D, generator=g), torch.zeros(H, D))
        return lambda: cp_ttt(ttt_linear, q, k, v, lr, torch.ones(H, D), torch.zeros(H, D),
                              initial_state=init, mini_batch_size=16, micro_batches=micro_batches)[0]  # fmt: skip
    if name == "gated_deltanet":
        beta, alpha = torch.rand(B, H, T_r, generator=g), 0.9 + 0.1 * torch.rand(B, H, T_r, generator=g)
        return lambda: cp_family(fam.gated_deltanet, q, k, v, beta=beta, alpha=alpha)[0]
    return lambda: cp_attention(q, k, v)


def _step(fn) -> None:
    o = fn()
    o.square().mean().backward()


def worker(
    rank: int,
    world: int,
    name: str,
    B: int,
    H: int,
    T: int,
    D: int,
    reps: int,
    timed: bool,
    micro_batches: int,
) -> dict:
    T_r = T // world
    if not timed:  # bytes only: the exchange without the op's compute
        COUNTER.reset()
        if name == "attention":
            kv = torch.zeros(2, B, H, T_r, D, requires_grad=True)
            all_gather(kv).sum().backward()
        else:
            _step(_inputs(name, B, H, min(T_r, 64), D, seed=rank))
        return {"bytes": dict(COUNTER.bytes)}
    fn = _inputs(name, B, H, T_r, D, seed=rank, micro_batches=micro_batches)
    _step(fn)  # warm-up
    times = []
    for _ in range(reps):
        dist.barrier()
        COUNTER.reset()
        t = time.perf_counter()
        _step(fn)
        dist.barrier()
        times.append(time.perf_counter() - t)
    return {"seconds": sorted(times)[len(times) // 2], "bytes": dict(COUNTER.bytes)}


def _one_process(name: str, B: int, H: int, T: int, D: int, reps: int) -> float:
    """R = 1: the plain op (no process group): the same inputs, no exchange."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, T, D, generator=g).requires_grad_() for _ in range(3))
    if name == "ttt_linear":
        init = (0.02 * torch.randn(H, D, D, generator=g), torch.zeros(H, D))
        fn = lambda: ttt_linear(q, k, v, torch.full((B, H, T), 0.1), torch.ones(H, D), torch.zeros(H, D),  # noqa: E731
                                initial_state=init, mini_batch_size=16)[0]  # fmt: skip
    elif name == "gated_deltanet":
        beta, alpha = torch.rand(B, H, T, generator=g), 0.9 + 0.1 * torch.rand(B, H, T, generator=g)
        fn = lambda: fam.gated_deltanet(q, k, v, beta=beta, alpha=alpha)[0]  # noqa: E731
    else:
        fn = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    _step(fn)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        _step(fn)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def main() -> None:
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--time-T", type=int, nargs="+", default=[8192])
    p.add_argument(
        "--attention-time-T",
        type=int,
        nargs="+",
        default=[8192],
        help="lengths attention is timed at (its (T/R) x T score blocks grow quadratically)",
    )
    p.add_argument("--bytes-T", type=int, nargs="+", default=[8192, 16384, 32768, 65536])
    p.add_argument("--schemes", nargs="+", default=list(SCHEMES))
    p.add_argument("--B", type=int, default=1)
    p.add_argument("--H", type=int, default=2)
    p.add_argument("--D", type=int, default=16)
    p.add_argument("--micro-batches", type=int, default=1, help="the relay's pipelining pieces (divides B)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default="benchmarks/results/context_parallel_cpu")
    a = p.parse()
    torch.set_num_threads(1)
    rows = []
    for name in a.schemes:
        time_T = a.attention_time_T if name == "attention" else a.time_T
        for T in sorted(set(time_T) | set(a.bytes_T)):
            for R in a.ranks:
                timed = T in time_T
                row = {"scheme": SCHEMES[name], "op": name, "T": T, "R": R, "B": a.B, "H": a.H, "D": a.D}
                if name == "ttt_linear":
                    row["micro_batches"] = a.micro_batches
                state = {"state_numel": a.D * a.D + a.D} if name == "ttt_linear" else {}
                mid = name == "ttt_linear" and (T // R) % 16 != 0
                row["bytes_analytic"] = cp_bytes(
                    SCHEMES[name], B=a.B, H=a.H, T=T, D=a.D, R=R, element_size=4, mid_mini_batch=mid, **state
                )
                if R == 1:
                    row["bytes_counted"] = {"forward": 0, "backward": 0}
                    if timed:
                        row["seconds"] = _one_process(name, a.B, a.H, T, a.D, a.reps)
                else:
                    res = spawn(
                        worker, R, name, a.B, a.H, T, a.D, a.reps, timed, a.micro_batches, start_method="fork"
                    )
                    row["bytes_counted"] = {
                        d: max(r["bytes"][d] for r in res) for d in ("forward", "backward")
                    }
                    if timed:
                        row["seconds"] = max(r["seconds"] for r in res)
                rows.append(row)
                print(json.dumps(row), flush=True)
    meta = {
        "command": "python " + " ".join(sys.argv),
        "machine": f"{platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores (shared)",
        "torch": torch.__version__,
        "threads_per_rank": 1,
    }
    with open(a.out + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
