"""Root of the ``ttt`` command. Each subcommand is a module of ``ttt.cli`` that declares its help line
(``HELP``), examples (``EPILOG``), argument dataclass (``ARGS``, options built by
:func:`ttt.recipes.args.add_subcommand`, with ``OPTIONS`` passed on) and ``run(args) -> exit code``; it
imports its recipe only when it runs, so ``ttt -h`` stays fast."""

from __future__ import annotations

import argparse
import os
import sys

from ttt._interrupt import in_main_thread, sigint_raises_interrupted
from ttt.recipes.args import Parser, add_subcommand, dataclass_from_namespace

from . import bench, convert, eval, generate, ls, train

#: the subcommands, listed once
COMMANDS = (train, eval, generate, bench, ls, convert)

DESCRIPTION = """Train, evaluate, sample from and benchmark Test-Time Training (TTT) language models, and
convert a pretrained Llama model's attention to TTT. 'ttt <command> -h' shows its options and examples."""

EPILOG = """examples:
  ttt train                                   # TTT-Linear, tiny preset, Shakespeare, CPU: a few minutes
  ttt train --mixer attention                 # the attention baseline, same shape and parameters
  ttt eval --checkpoint runs/ttt_linear-tiny  # bits per byte and loss vs position
  ttt generate --checkpoint runs/ttt_linear-tiny --prompt "ROMEO:"
  ttt bench --mixers ttt_linear,attention --lengths 256,1024,4096
  ttt ls                                      # mixers, presets, corpora
  ttt convert --mixer ttt_linear              # SmolLM2-135M's attention -> TTT-Linear (distilled)
"""


def version() -> str:
    """The installed distribution's version, else ``ttt.__version__`` (a source tree on sys.path)."""
    from importlib import metadata

    try:
        return metadata.version("ttt")
    except metadata.PackageNotFoundError:
        import ttt

        return getattr(ttt, "__version__", "unknown")


def build_parser() -> Parser:
    parser = Parser(
        prog="ttt",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"ttt {version()}")
    parser.add_argument(
        "--debug",
        action="store_true",
        help="on an error, print the full traceback, not only its message (or set TTT_DEBUG=1)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="<command>")
    for module in COMMANDS:
        name = module.__name__.rsplit(".", 1)[-1]
        sub = add_subcommand(subparsers, name, module.ARGS, help=module.HELP, description=module.__doc__,
                             epilog=module.EPILOG, **getattr(module, "OPTIONS", {}))  # fmt: skip
        sub.set_defaults(_command=module)  # a name no argument dataclass can have
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``ttt`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse(argv)
    if args.command is None:
        parser.print_help()
        return 2
    debug = args.debug or os.environ.get("TTT_DEBUG", "") not in ("", "0")
    if argv is None:  # the process's own command line: Ctrl-C must end it with 130 wherever it lands
        sigint_raises_interrupted()
    try:
        module = args._command
        code = int(module.run(dataclass_from_namespace(module.ARGS, args)) or 0)
        # a reader that went away (ttt eval | head -1) shows up here, not at interpreter exit
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        _discard_stdout()
        return 141  # 128 + SIGPIPE, what a shell reports for a writer whose reader has gone
    except KeyboardInterrupt:
        if argv is None:  # the process's own command line: it ends right after this
            _ignore_further_interrupts()
        print(f"ttt {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError, RuntimeError, ImportError, ArithmeticError) as e:
        if debug:
            import traceback

            traceback.print_exc()
        print(f"ttt {args.command}: error: {_one_line(e, debug)}", file=sys.stderr)
        return 1


def _one_line(e: BaseException, debug: bool) -> str:
    """An error's message as one line: its first line (torch's C++ errors go on with stack frames). A
    refused value (``ValueError``) or argument (``CheckpointError``) says what was expected; other errors
    may come from deep inside, so they end with how to see the traceback."""
    from ttt.models.checkpoint import CheckpointError

    lines = str(e).strip().splitlines() or [type(e).__name__]
    if debug or isinstance(e, ValueError | CheckpointError):
        return lines[0]
    return lines[0] + " (run with TTT_DEBUG=1 or ttt --debug for the traceback)"


def _ignore_further_interrupts() -> None:
    """Once stopping on an interrupt, a SIGINT / SIGTERM still pending (one caught by a deferring handler
    and replayed, or a second one) must not raise again after the exit code is chosen: Python would then
    end the process by SIGINT instead of 130."""
    import signal

    if in_main_thread():
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_IGN)


def _discard_stdout() -> None:
    """Point stdout at /dev/null so that Python's final flush does not fail again (Python docs, "Note
    on SIGPIPE")."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main())
