"""Root of the ``ttt`` command. Subcommands register themselves with ``create(subparsers)`` and import
their recipe only when they run, so ``ttt -h`` stays fast."""

from __future__ import annotations

import argparse
import sys

from . import bench, eval, generate, ls, train

#: the subcommands, listed once
COMMANDS = (train, eval, generate, bench, ls)

EPILOG = """examples:
  ttt train                                   # TTT-Linear, tiny preset, Shakespeare, CPU: a few minutes
  ttt train --mixer attention --steps 300     # the attention baseline
  ttt eval --checkpoint runs/ttt_linear-tiny  # bits per byte and loss vs position
  ttt generate --checkpoint runs/ttt_linear-tiny --prompt "ROMEO:"
  ttt bench --mixers ttt_linear,attention --lengths 256,1024,4096
  ttt ls                                      # mixers, presets, corpora
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ttt",
        description="Train, evaluate, sample from and benchmark Test-Time Training language models.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    subparsers = parser.add_subparsers(dest="command", metavar="<command>")
    for module in COMMANDS:
        module.create(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``ttt`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"ttt {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError, RuntimeError, ImportError) as e:
        print(f"ttt {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
