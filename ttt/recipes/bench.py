"""Benchmark mixers against attention: forward and forward+backward time, memory, state size vs context.

Each mixer first passes a correctness gate (a chunked prefill followed by single-token steps must match
one forward pass over the same tokens); a mixer that fails it is not timed. Memory is the peak CUDA
allocation on GPU; on CPU it is the bytes the autograd graph saves for the backward pass (activation
memory), which is what grows with the context. State bytes are what decoding carries after T tokens:
fast weights for TTT, the KV cache for attention.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ttt._extras import require

from .args import BenchArgs
from .common import counted, format_table, reserved_stem, resolve_device, save_figure, with_threads

__all__ = ["BenchRow", "bench", "check_decode_matches_forward", "run_bench"]


@dataclass
class BenchRow:
    mixer: str
    length: int
    forward_ms: float
    forward_backward_ms: float
    forward_tokens_per_second: float
    memory_mb: float
    state_kb: float


def check_decode_matches_forward(
    layer: nn.Module, dim: int, device: torch.device, length: int = 37, prefix: int = 21
) -> float:
    """Max |difference| between ``layer(x)`` and prefill(``prefix``) + single steps; raises if it is large."""
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(2, length, dim, generator=g).to(device)
    with torch.no_grad():
        full, _ = layer(x)
        y, state = layer(x[:, :prefix])
        outs = [y]
        for t in range(prefix, length):
            y, state = layer.step(x[:, t : t + 1], state)
            outs.append(y)
    err = float((torch.cat(outs, dim=1) - full).abs().max())
    scale = float(full.abs().max())
    if not err <= 1e-3 * max(1.0, scale):
        raise RuntimeError(
            f"{type(layer).__name__}: prefill + decode differs from forward by {err:.3g}; "
            "refusing to benchmark a path that fails its correctness check"
        )
    return err


def _time(fn, repeats: int, sync) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _saved_bytes(layer: nn.Module, x: Tensor) -> int:
    total = 0

    def pack(t: Tensor) -> Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    return total


def bench(args: BenchArgs) -> list[BenchRow]:
    """Run the benchmark; writes ``bench.md``, ``bench.json`` and ``bench.png`` into ``args.out``
    (``bench-2.*``, ``bench-3.*``, ... where earlier results are: nothing is replaced)."""
    return run_bench(args)[0]


@with_threads
def run_bench(args: BenchArgs) -> tuple[list[BenchRow], Path]:
    """:func:`bench`, also returning the path of the table it wrote."""
    from ttt.layers import MIXERS
    from ttt.models import state_nbytes
    from ttt.models.checkpoint import check_out_dir

    check_out_dir(args.out, expected="a directory", for_run=False)
    device = resolve_device(args.device)
    mixers = [m.strip() for m in args.mixers.split(",") if m.strip()]
    if not mixers:
        raise ValueError(f"--mixers is empty; expected comma-separated names of {sorted(MIXERS)}")
    unknown = [m for m in mixers if m not in MIXERS]
    if unknown:
        raise ValueError(f"unknown mixer(s) {unknown}; choose from {sorted(MIXERS)}")
    for flag, value in (("--dim", args.dim), ("--heads", args.heads), ("--batch-size", args.batch_size),
                        ("--repeats", args.repeats)):  # fmt: skip
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if args.dim % args.heads:
        raise ValueError(f"--dim ({args.dim}) must be divisible by --heads ({args.heads})")
    try:
        lengths = [int(t) for t in args.lengths.split(",")]
    except ValueError:
        lengths = [0]
    if any(t < 1 for t in lengths):
        raise ValueError(
            f"--lengths must be comma-separated integers >= 1, e.g. '256,1024', got {args.lengths[:60]!r}"
        )
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    rows: list[BenchRow] = []
    for name in mixers:
        torch.manual_seed(0)
        layer = MIXERS[name](dim=args.dim, num_heads=args.heads).to(device)
        check_decode_matches_forward(layer, args.dim, device)
        for length in lengths:
            x = torch.randn(args.batch_size, length, args.dim, device=device, requires_grad=True)

            def fwd(layer: nn.Module = layer, x: Tensor = x) -> None:
                with torch.no_grad():
                    layer(x)

            def fwd_bwd(layer: nn.Module = layer, x: Tensor = x) -> None:
                y, _ = layer(x)
                y.float().pow(2).mean().backward()

            t_f = _time(fwd, args.repeats, sync)
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            t_fb = _time(fwd_bwd, args.repeats, sync)
            if cuda:
                memory = torch.cuda.max_memory_allocated(device) - base
            else:
                memory = _saved_bytes(layer, x)
            with torch.no_grad():
                _, state = layer(x)
            rows.append(
                BenchRow(
                    name,
                    length,
                    t_f * 1e3,
                    t_fb * 1e3,
                    args.batch_size * length / t_f,
                    memory / 2**20,
                    state_nbytes(state) / 2**10,
                )
            )
    return rows, _write(rows, args, device)


def _write(rows: list[BenchRow], args: BenchArgs, device: torch.device) -> Path:
    """``bench.md``, ``.json`` and ``.png`` (or ``bench-N.*``, the first free name) in ``args.out``; returns
    the table's path."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with reserved_stem(out, "bench", lambda s: [f"{s}.md", f"{s}.json", f"{s}.png"]) as stem:
        return _write_as(rows, args, device, out, stem)


def _write_as(rows: list[BenchRow], args: BenchArgs, device: torch.device, out: Path, stem: str) -> Path:
    from ttt.models.checkpoint import write_text_atomic

    md, js, png = (out / f"{stem}.{ext}" for ext in ("md", "json", "png"))
    hw = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU, {counted(torch.get_num_threads(), 'thread')}"
    )
    mem = "peak CUDA MiB" if device.type == "cuda" else "saved-for-backward MiB"
    table = format_table(
        ["mixer", "T", "fwd ms", "fwd tok/s", "fwd+bwd ms", mem, "state KiB"],
        [
            [
                r.mixer,
                r.length,
                f"{r.forward_ms:.2f}",
                f"{r.forward_tokens_per_second:,.0f}",
                f"{r.forward_backward_ms:.2f}",
                f"{r.memory_mb:.2f}",
                f"{r.state_kb:,.1f}",
            ]
            for r in rows
        ],
    )
    # atomic writes (a temporary renamed into place) under names nothing holds: never through a link
    write_text_atomic(
        md,
        f"# Layer benchmark\n\n{hw}; dim {args.dim}, {args.heads} heads, batch "
        f"{args.batch_size}, torch {torch.__version__}\n\n{table}\n",
    )
    write_text_atomic(js, json.dumps([asdict(r) for r in rows], indent=1))
    try:
        require("matplotlib", f"the plot {png.name}").use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        print(f"written: {md}, {js}; no {png.name}: {e}", file=sys.stderr)
        return md
    fig, axes = plt.subplots(1, 3, figsize=(13, 4), dpi=110)
    for name in dict.fromkeys(r.mixer for r in rows):
        rs = [r for r in rows if r.mixer == name]
        ts = [r.length for r in rs]
        axes[0].plot(ts, [r.forward_backward_ms for r in rs], marker="o", label=name)
        axes[1].plot(ts, [r.memory_mb for r in rs], marker="o", label=name)
        axes[2].plot(ts, [r.state_kb for r in rs], marker="o", label=name)
    for ax, ylabel in zip(axes, ["forward+backward ms", mem, "decode state KiB"]):
        ax.set(xscale="log", xlabel="context length T", ylabel=ylabel)
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{hw}, dim {args.dim}, {args.heads} heads")
    fig.tight_layout()
    save_figure(fig, png)
    print(f"written: {md}, {js}, {png}", file=sys.stderr)
    return md
