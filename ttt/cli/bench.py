"""``ttt bench``: layer throughput, memory and state size vs context length, mixers vs attention."""

from __future__ import annotations

from ttt.recipes.args import BenchArgs

EPILOG = """examples:
  ttt bench                                           # tiny width, CPU-friendly lengths
  ttt bench --mixers ttt_linear,attention --lengths 512,2048,8192 --device cuda --dim 1024 --heads 16
  ttt bench --out benchmarks/results/my_machine
"""
HELP = "benchmark mixers against attention"
ARGS = BenchArgs


def run(args: BenchArgs) -> int:
    from pathlib import Path

    from ttt.recipes.bench import bench

    bench(args)
    print((Path(args.out) / "bench.md").read_text())
    return 0
