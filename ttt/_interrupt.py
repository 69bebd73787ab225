"""The interrupt that this library's signal handlers raise, and where it turns back into KeyboardInterrupt.

CPython marks a process to end by SIGINT when exactly ``KeyboardInterrupt`` leaves code run by ``exec``
of a string (dataclasses and many libraries build functions that way while modules import), even when a
caller catches the exception later. ``python -m ttt.cli.main train`` then ended by SIGINT instead of
exiting with 130 about one run in ten. So the handlers raise :class:`Interrupted`, a subclass, which
leaves no such mark; :func:`plain_interrupt` turns it back into ``KeyboardInterrupt`` where it leaves the
library (``lock_run``'s block), so a caller of ``train()`` sees what it always saw, and a script that does
not catch it still ends by SIGINT, as Python programs do.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = [
    "Interrupted",
    "in_main_thread",
    "plain_interrupt",
    "raise_interrupted",
    "sigint_raises_interrupted",
]


class Interrupted(KeyboardInterrupt):
    """A SIGINT or SIGTERM caught by one of this library's handlers."""


def raise_interrupted(signum: int, frame: Any) -> None:
    """A signal handler: raise :class:`Interrupted`."""
    raise Interrupted


@contextmanager
def plain_interrupt() -> Iterator[None]:
    """An :class:`Interrupted` leaving the block leaves it as plain ``KeyboardInterrupt``."""
    try:
        yield
    except Interrupted:
        raise KeyboardInterrupt from None


def in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def sigint_raises_interrupted() -> None:
    """For a process's own command line: Ctrl-C raises :class:`Interrupted` (when SIGINT has Python's
    default handler, in the main thread)."""
    if in_main_thread() and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, raise_interrupted)
