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
    from ttt.recipes.bench import run_bench

    _, table = run_bench(args)
    print(table.read_text())
    return 0
