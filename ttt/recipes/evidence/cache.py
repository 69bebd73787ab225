"""An evidence run's cache file: read it back (one line when it is not a record), and hold a run's lock while
one process trains it, so processes sharing a results directory never train one run twice."""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["RunBusy", "read_cache", "run_lock", "run_once"]


def read_cache(path: Path) -> dict | None:
    """A cached run record, or None when there is none; a file that is not a JSON object (edited by hand,
    cut short) stops the experiment with one line naming it, and is left as it is."""
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        record = e
    if not isinstance(record, dict):
        raise SystemExit(f"{path}: not a JSON run record ({record}); move it away to rerun that run")
    return record


class RunBusy(Exception):
    """Another process holds the lock of the run asked for: it is training that run now."""


@contextlib.contextmanager
def run_lock(cache: Path) -> Iterator[None]:
    """Hold the lock of the run cached at ``cache`` (``<stem>.lock`` beside it, ``flock``) while this
    process trains it, so two processes sharing a results directory never train one run twice; raises
    ``RunBusy`` naming the holder when another process holds it. The kernel drops a lock when its holder
    ends, even killed, so a lock file left behind never blocks a run. The holder writes the run's record
    before it lets go: callers look the cache up again once they hold the lock. (No lock where the
    platform has no ``fcntl``.)"""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    lock = cache.with_suffix(".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        f = open(lock, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown process"
            f.close()
            raise RunBusy(f"{cache.stem}: another process is training it ({holder}; lock {lock})") from None
        # the previous holder deletes the file as it lets go: a lock on a file no longer at ``lock`` (a
        # third process may hold the new one) is no lock, so open the path again
        try:
            same = os.stat(lock).st_ino == os.fstat(f.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        f.close()
    with f:
        f.seek(0)
        f.truncate()
        f.write(f"{socket.gethostname()} {os.getpid()}\n")
        f.flush()
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)  # before the lock drops (closing f): see the check above


def run_once(cache: Path, lookup: Callable[[], dict | None], train: Callable[[], dict]) -> dict:
    """The run's record: ``lookup()`` when the cache has it, else ``train()`` (which writes it to ``cache``)
    under the run's lock, after looking again once the lock is held (another process may have finished it
    meanwhile). Raises ``RunBusy`` when another process is training it."""
    record = lookup()
    if record is None:
        with run_lock(cache):
            record = lookup()
            if record is None:
                record = train()
    return record
