"""``ttt ls``: list the mixers, model presets and corpora that the other commands accept."""

from __future__ import annotations

import argparse

EPILOG = """examples:
  ttt ls
"""


def create(subparsers: argparse._SubParsersAction) -> None:
    from ttt.recipes.args import add_subcommand

    p = add_subcommand(
        subparsers, "ls", help="list mixers, presets and corpora", description=__doc__, epilog=EPILOG
    )
    p.set_defaults(func=run)


def run(ns: argparse.Namespace) -> int:
    from ttt.data import CORPORA
    from ttt.layers import MIXERS
    from ttt.models import PRESETS

    print("mixers:  " + ", ".join(sorted(MIXERS)))
    print("presets:")
    for name, p in PRESETS.items():
        print(
            f"  {name:6} dim {p['dim']:5}  layers {p['n_layers']:3}  heads {p['n_heads']:3}  "
            f"mlp {p['mlp_hidden']:5}  max_seq_len {p['max_seq_len']}"
        )
    print("corpora: " + ", ".join(sorted(CORPORA)) + ", or a path to a text file / directory")
    return 0
