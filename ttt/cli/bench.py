"""``ttt bench``: layer throughput, memory and state size vs context length, mixers vs attention."""

from __future__ import annotations

import argparse

EPILOG = """examples:
  ttt bench                                           # tiny width, CPU-friendly lengths
  ttt bench --mixers ttt_linear,attention --lengths 512,2048,8192 --device cuda --dim 1024 --heads 16
  ttt bench --out benchmarks/results/my_machine
"""


def create(subparsers: argparse._SubParsersAction) -> None:
    from ttt.recipes.args import BenchArgs, add_subcommand

    p = add_subcommand(
        subparsers,
        "bench",
        BenchArgs,
        help="benchmark mixers against attention",
        description=__doc__,
        epilog=EPILOG,
    )
    p.set_defaults(func=run)


def run(ns: argparse.Namespace) -> int:
    from pathlib import Path

    from ttt.recipes.args import BenchArgs, dataclass_from_namespace
    from ttt.recipes.bench import bench

    args = dataclass_from_namespace(BenchArgs, ns)
    bench(args)
    print((Path(args.out) / "bench.md").read_text())
    return 0
