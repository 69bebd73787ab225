"""CPU benchmark of the delta rows: chunk form vs token recurrence for Gated DeltaNet and
DeltaNet, and fla-core 0.6.0's pure-PyTorch references at the same shapes.

    python benchmarks/family_cpu.py                    # B=1 H=4 T=4096 D=64, float32
    python benchmarks/family_cpu.py --T 1024 --repeats 1   # quicker

Before timing, every path's output is checked against our chunk form in float64 at a small shape
(fla's references run in float32 internally, so they are held to float32 round-off). Times are
medians of ``--repeats`` runs after one warm-up, the paths taking turns; fwd+bwd backpropagates
``o.sum()`` to q, k, v, beta (and alpha). Results go to ``benchmarks/results/family_cpu.md``.
"""

from __future__ import annotations

import datetime
import importlib.util
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import ttt.ops.family as fam
from ttt.recipes.args import Parser


def _fla_naive(rel: str):
    spec = importlib.util.find_spec("fla")
    if spec is None:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "ops" / rel / "naive.py"
    mod_spec = importlib.util.spec_from_file_location(f"_fla_naive_{rel}", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module


def make_inputs(B, H, T, D, dtype, grad):
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(3, B, H, T, D, generator=g, dtype=dtype).unbind(0)
    x = {
        "q": q,
        "k": F.normalize(k, dim=-1),
        "v": v,
        "beta": torch.rand(B, H, T, generator=g, dtype=dtype),
        "log_alpha": -0.1 * torch.rand(B, H, T, generator=g, dtype=dtype),
    }
    return {n: t.requires_grad_(grad) for n, t in x.items()}


def paths(rule: str):
    """name -> fn(inputs) -> o [B, H, T, D] for the given rule."""
    gdn = _fla_naive("gated_delta_rule")
    dr = _fla_naive("delta_rule")
    out = {}
    if rule == "gated_deltanet":
        for impl in ("chunk", "recurrent"):
            out[f"ttt {impl}"] = lambda x, impl=impl: fam.gated_deltanet(
                x["q"], x["k"], x["v"], beta=x["beta"], log_alpha=x["log_alpha"], impl=impl
            )[0]
        if gdn is not None:
            tr = lambda t: t.transpose(1, 2)  # noqa: E731
            out["fla naive_chunk (C=64)"] = lambda x: tr(
                gdn.naive_chunk_gated_delta_rule(
                    tr(x["q"]), tr(x["k"]), tr(x["v"]), tr(x["log_alpha"]), tr(x["beta"]), chunk_size=64
                )[0]
            )
            out["fla naive_recurrent"] = lambda x: tr(
                gdn.naive_recurrent_gated_delta_rule(
                    tr(x["q"]), tr(x["k"]), tr(x["v"]), tr(x["beta"]), tr(x["log_alpha"])
                )[0]
            )
    else:
        for impl in ("chunk", "recurrent"):
            out[f"ttt {impl}"] = lambda x, impl=impl: fam.deltanet(
                x["q"], x["k"], x["v"], beta=x["beta"], impl=impl
            )[0]
        if dr is not None:
            out["fla delta_rule_chunkwise (C=64)"] = lambda x: dr.delta_rule_chunkwise(
                x["q"], x["k"], x["v"], x["beta"], chunk_size=64
            )[0]
            out["fla delta_rule_recurrence"] = lambda x: dr.delta_rule_recurrence(
                x["q"], x["k"], x["v"], x["beta"]
            )[0]
    return out


def check(rule: str) -> None:
    """Refuse to time a wrong path: all agree with our float64 chunk form at B1 H2 T128 D16."""
    x = make_inputs(1, 2, 128, 16, torch.float64, False)
    ps = paths(rule)
    ref = ps["ttt chunk"](x).double()
    for name, fn in ps.items():
        err = (fn(x).double() - ref).abs().max().item()
        budget = 1e-10 if name.startswith("ttt") else 1e-4 * ref.abs().max().item()
        if not err < budget:
            raise SystemExit(f"{rule} {name}: max error {err:.3g} > {budget:.3g}; refusing to time it")
        print(f"check {rule:15s} {name:32s} max err vs ttt chunk (fp64) {err:.1e}")


def cpu_name() -> str:
    """The CPU's model name where the OS reports it (Linux), else the architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _minor_faults() -> int:
    """Minor page faults of this process so far (0 where the OS does not report them)."""
    try:
        import resource
    except ImportError:  # not on Windows
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def median_times(fns: dict, repeats: int) -> dict:
    """name -> (median CPU time of the process, median minor page faults per run) for each of
    ``fns``. CPU time (``time.process_time``; single-threaded runs) is the compute time and robust
    to other jobs on a shared machine; the page faults show when a run paid for fresh memory (the
    allocator had handed freed buffers back to the OS), which varies from run to run.

    The paths take turns, one run each per round, so a burst of load from another job lands on all
    of them instead of on one path's repeats. The first run is a warm-up, except for paths slower
    than 2 s, where it is the measurement.
    """

    def timed(fn) -> tuple[float, int]:
        faults = _minor_faults()
        t0 = time.process_time()
        fn()
        return time.process_time() - t0, _minor_faults() - faults

    first = {name: timed(fn) for name, fn in fns.items()}
    runs = {name: [] for name, (t, _) in first.items() if t <= 2.0}
    for _ in range(repeats):
        for name in runs:
            runs[name].append(timed(fns[name]))

    def medians(samples):
        return statistics.median(t for t, _ in samples), int(statistics.median(f for _, f in samples))

    return {name: medians(runs[name]) if name in runs else first[name] for name in fns}


def main() -> None:
    ap = Parser(description=__doc__.splitlines()[0])
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--H", type=int, default=4)
    ap.add_argument("--T", type=int, default=4096)
    ap.add_argument("--D", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (shared 2-core box: 1)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "family_cpu.md"))
    args = ap.parse()
    torch.set_num_threads(args.threads)
    rows = []
    for rule in ("gated_deltanet", "deltanet"):
        check(rule)
        for backward in (False, True):
            x = make_inputs(args.B, args.H, args.T, args.D, torch.float32, backward)

            def run(fn, x=x, backward=backward):
                if backward:
                    fn(x).sum().backward()
                else:
                    with torch.no_grad():
                        fn(x)

            runs = {name: (lambda fn=fn: run(fn)) for name, fn in paths(rule).items()}
            mode = "fwd+bwd" if backward else "fwd"
            for name, (t, faults) in median_times(runs, args.repeats).items():
                rows.append((rule, mode, name, t, faults))
                print(f"{rule:15s} {mode:8s} {name:32s} {t * 1e3:10.1f} ms {faults:8d} faults", flush=True)
    finished = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = shlex.join(["python", "benchmarks/family_cpu.py", *sys.argv[1:]])
    header = (
        f"# Family delta rows on CPU: chunk vs recurrence vs fla-core 0.6.0 references\n\n"
        f"B={args.B} H={args.H} T={args.T} D={args.D}, float32, process CPU time, median of {args.repeats} "
        "after a warm-up, paths taking turns (paths over 2 s: one run), "
        f"torch {torch.__version__}, {args.threads} thread(s), {cpu_name()}, "
        f"{torch.get_num_interop_threads()} interop threads; finished {finished}. "
        f"Produced by `{command}`.\n\n"
        "Page faults: median minor page faults of the process per run (memory pages touched for the first "
        "time since the allocator got them from the OS, e.g. after it had handed freed buffers back; their "
        "cost is part of the ms column, and it varies from run to run of the same code).\n\n"
        "| rule | mode | path | ms | vs ttt chunk | page faults |\n|---|---|---|---|---|---|\n"
    )
    base = {(r, m): t for r, m, n, t, _ in rows if n == "ttt chunk"}
    body = "\n".join(
        f"| {r} | {m} | {n} | {t * 1e3:.1f} | {t / base[(r, m)]:.2f}x | {f} |" for r, m, n, t, f in rows
    )
    Path(args.out).write_text(header + body + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
