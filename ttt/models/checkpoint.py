"""Atomic checkpoints: safetensors for tensors, one JSON for the config and everything else.

Layout of a run directory::

    out/
      latest                       # text: name of the newest complete checkpoint ("step-000300")
      step-000300/
        model.safetensors          # model weights
        trainer.safetensors        # optimizer moments, RNG states (training checkpoints only)
        checkpoint.json            # LMConfig, tokenizer, step, scalars, sha256 of both tensor files
                                   # and of its own content ("meta_sha256")
      .lock                        # pid of the `ttt train` writing into the directory (while it runs)

A checkpoint is written into a hidden temporary directory, fsynced, renamed into place (atomic on
POSIX), and only then is ``latest`` replaced (temp file + ``os.replace``). A process killed at any
moment therefore leaves ``latest`` pointing at a complete checkpoint; a save that fails (a full disk)
removes its temporary directory and leaves ``latest`` as it was. Loading verifies the hashes, so a
truncated, corrupted or edited file gives a clear error instead of silently wrong weights, and checks
every field of ``checkpoint.json`` (types, ranges, sizes) before a model is built. ``latest`` may only
name a ``step-N`` directory inside its run directory.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ttt._interrupt import in_main_thread, plain_interrupt, raise_interrupted

from .config import LMConfig

__all__ = [
    "CheckpointError",
    "RunLocked",
    "check_out_dir",
    "checkpoint_tokenizer",
    "clear_run",
    "find_checkpoint",
    "has_checkpoints",
    "latest_note",
    "load_checkpoint",
    "load_model",
    "lock_run",
    "refuse_links",
    "save_checkpoint",
    "validate_meta",
    "update_checkpoint_meta",
    "write_text_atomic",
]

# 2: checkpoint.json carries the sha256 of its own content ("meta_sha256")
FORMAT = "ttt-checkpoint-2"
# the files save_checkpoint writes into a checkpoint directory
CHECKPOINT_FILES = frozenset({"model.safetensors", "trainer.safetensors", "checkpoint.json"})
_STEP_DIR = re.compile(r"step-(\d+)")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupted, or belongs to another configuration."""


class RunLocked(CheckpointError):
    """Another live process trains in this run directory."""


# what a checkpoint.json may describe: a sanity bound per size, far above every preset, so that an edited
# or hostile file cannot make the reader allocate without bound before the weights are compared
_CONFIG_INTS = {
    "vocab_size": (1, 1 << 22),
    "dim": (1, 1 << 16),
    "n_layers": (1, 1024),
    "n_heads": (1, 1 << 12),
    "max_seq_len": (1, 1 << 24),
    "mlp_hidden": (1, 1 << 20),
}
_META_REQUIRED = ("format", "step", "config", "sha256", "meta_sha256")


def config_bound(key: str) -> int:
    """The largest value of the ``LMConfig`` size ``key`` (``vocab_size``, ``max_seq_len``, ...) that a
    checkpoint may record: :func:`load_checkpoint` refuses a larger one, so nothing larger is written."""
    return _CONFIG_INTS[key][1]


LOCK_NAME = ".lock"


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes, as hex (read in 1 MiB pieces)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _meta_digest(doc: dict[str, Any]) -> str:
    """sha256 of a checkpoint.json's content (every field but the digest itself, keys sorted)."""
    body = {k: v for k, v in doc.items() if k != "meta_sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def _dump_meta(doc: dict[str, Any]) -> str:
    """checkpoint.json's text: strict JSON (no NaN / Infinity tokens) with the digest of its content."""
    try:
        return json.dumps({**doc, "meta_sha256": _meta_digest(doc)}, indent=1, allow_nan=False)
    except ValueError as e:
        raise CheckpointError(
            f"checkpoint metadata must be finite, strict JSON (NaN or infinity?): {e}"
        ) from e


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a text file so that readers see the old or the new content, never a part of it; a write
    that fails (a full disk) leaves the old file and no temporary behind."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), 0o644)
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(
    run_dir: str | os.PathLike,
    *,
    step: int,
    model_state: dict[str, Tensor],
    config: LMConfig,
    meta: dict[str, Any] | None = None,
    trainer_tensors: dict[str, Tensor] | None = None,
    keep: int = 2,
) -> Path:
    """Write ``run_dir/step-{step}`` atomically, point ``run_dir/latest`` at it, prune old ones.

    Args:
        model_state: ``model.state_dict()`` (tied weights are stored once).
        meta: JSON-serialisable extras (tokenizer, training arguments, optimizer scalars, losses);
            finite numbers only (strict JSON).
        trainer_tensors: optimizer moments and RNG states, flattened to ``name -> tensor``.
        keep: how many checkpoints to keep: this one and the ``keep - 1`` newest of lower step;
            checkpoints of a higher step (left by a run resumed from an older one) are never pruned.

    Returns:
        the checkpoint directory.

    Raises:
        CheckpointError: the checkpoint could not be written (a full disk, ...); nothing of it is left
            and ``latest`` still names the previous checkpoint.
    """
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:06d}"
    tmp = Path(tempfile.mkdtemp(dir=run, prefix=f".tmp-{name}-"))
    try:
        _write_checkpoint_files(tmp, step, model_state, config, meta, trainer_tensors)
        final = run / name
        replace_dir(tmp, final)  # over the same step saved before (a run resumed from an older checkpoint)
        write_text_atomic(run / "latest", name + "\n")
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(
            f"could not save checkpoint {name} in {run}: {e}; {latest_note(run)}; nothing of {name} is left"
        ) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    older = sorted((s, p) for s, p in _step_dirs(run) if s < step)
    for _, old_dir in older[: max(0, len(older) - keep + 1)] if keep > 0 else []:
        shutil.rmtree(old_dir, ignore_errors=True)
    for stale in [*run.glob(".tmp-step-*"), *run.glob(".trash-*"), *run.glob(".step-*.old-*")]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def replace_dir(tmp: Path, final: Path) -> None:
    """Rename the finished directory ``tmp`` to its sibling ``final``. An existing ``final`` (or a link
    there) is first moved aside into a hidden ``.<name>.old-*`` directory beside it, put back if the rename
    of ``tmp`` fails, and removed once ``tmp`` is in place: ``final`` is never a mix of the two (a process
    killed in between leaves the old one aside, which its writer's next run removes)."""
    if not (final.exists() or final.is_symlink()):
        os.replace(tmp, final)
        return
    old = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.old-"))
    os.replace(final, old / final.name)
    try:
        os.replace(tmp, final)
    except BaseException:
        os.replace(old / final.name, final)
        old.rmdir()
        raise
    shutil.rmtree(old, ignore_errors=True)


def _write_checkpoint_files(
    tmp: Path,
    step: int,
    model_state: dict[str, Tensor],
    config: LMConfig,
    meta: dict[str, Any] | None,
    trainer_tensors: dict[str, Tensor] | None,
) -> None:
    """The tensor files and checkpoint.json of one checkpoint, fsynced, into the directory ``tmp``."""
    from safetensors.torch import save_file

    os.chmod(tmp, 0o755)
    files = {"model.safetensors": _dedupe(model_state)}
    if trainer_tensors is not None:
        files["trainer.safetensors"] = trainer_tensors
    hashes = {}
    for fname, tensors in files.items():
        try:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / fname))
        except OSError:
            raise
        except Exception as e:  # safetensors reports a failed write (a full disk) as its own error type
            raise OSError(f"{fname}: {e}") from e
        os.chmod(tmp / fname, 0o644)
        _fsync(tmp / fname)
        hashes[fname] = file_sha256(tmp / fname)
    doc = {"format": FORMAT, "step": step, "config": config.to_dict(), "sha256": hashes, **(meta or {})}
    (tmp / "checkpoint.json").write_text(_dump_meta(doc))
    _fsync(tmp / "checkpoint.json")


def latest_note(run_dir: str | os.PathLike) -> str:
    """What a run directory's ``latest`` names now, for messages after a failure."""
    try:
        return f"'latest' in {run_dir} still names {find_checkpoint(run_dir).name}"
    except CheckpointError:
        return f"{run_dir} holds no earlier checkpoint"


def step_of_dir(name: str) -> int | None:
    """The step a checkpoint directory's name gives (``step-000200`` -> 200), or None for another name."""
    m = _STEP_DIR.fullmatch(name)
    return int(m[1]) if m else None


def _step_dirs(run: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of the ``step-<digits>`` directories of a run directory."""
    return [(step, p) for p in run.glob("step-*") if (step := step_of_dir(p.name)) is not None and p.is_dir()]


def has_checkpoints(run_dir: str | os.PathLike) -> bool:
    """Whether a directory holds a ``latest`` file or a ``step-N`` directory (complete or not)."""
    run = Path(run_dir)
    return (run / "latest").exists() or bool(_step_dirs(run))


def update_checkpoint_meta(ckpt_dir: str | os.PathLike, **fields: Any) -> None:
    """Replace top-level fields of a checkpoint's ``checkpoint.json`` (atomically; tensors unchanged)."""
    path = Path(ckpt_dir) / "checkpoint.json"
    doc = _read_meta(Path(ckpt_dir))
    reserved = {"format", "step", "config", "sha256", "meta_sha256"} & set(fields)
    if reserved:
        raise ValueError(f"cannot update {sorted(reserved)} of a checkpoint")
    write_text_atomic(path, _dump_meta({k: v for k, v in {**doc, **fields}.items() if k != "meta_sha256"}))


def check_out_dir(
    path: str | os.PathLike, *, flag: str = "--out", expected: str = "a run directory", for_run: bool = True
) -> Path:
    """Refuse, before any work, an output directory that cannot be one: an empty path (it would mean the
    current directory), ``path`` or a folder above it is a file (or another non-directory, a dangling
    link), or it is or lies inside a checkpoint directory (one holding ``checkpoint.json``: a run written
    there would mix with the checkpoint's files). With ``for_run`` (the ``--out`` of train / convert) also
    a HF model directory or a folder inside one, and a folder inside another run directory (one holding
    ``latest``): eval would read the model or that run instead. Raises a one-line ``ValueError`` naming
    ``flag`` and what was expected; returns ``Path(path)``. Nothing is created."""
    if not str(path):
        raise ValueError(f"{flag} is empty; expected {expected}")
    p = Path(path)
    for q in (p, *p.parents):
        where = f"{p} is" if q == p else f"{p}: {q} is"
        if q.is_dir():
            if (q / "checkpoint.json").is_file():
                raise ValueError(f"{flag} {where} a checkpoint directory; expected {expected} outside it")
            if for_run and _is_ttt_hf_dir(q):
                raise ValueError(f"{flag} {where} a HF model directory; expected {expected} outside it")
            if for_run and q != p and (q / "latest").is_file():
                raise ValueError(f"{flag} {where} a run directory; expected {expected} outside it")
            continue
        if q.exists() or q.is_symlink():
            what = "a file" if q.is_file() else "a link to nothing" if not q.exists() else "not a directory"
            raise ValueError(f"{flag} {where} {what}; expected {expected}")
    return p


@contextmanager
def lock_run(run_dir: str | os.PathLike) -> Iterator[Path]:
    """Hold ``run_dir/.lock`` (a file holding this process's pid) while the block runs.

    Raises :class:`RunLocked` when a live process holds it. The lock is an ``flock`` on that file, so
    it ends with its process however the process ends: a lock file left by a dead process (its pid is
    gone) is stale and taken over. A run directory created here and still empty at the end is removed.

    The file never outlives the block: in the main thread, a SIGTERM whose action is the default (end
    the process where it stands) raises ``KeyboardInterrupt`` while the lock is held, as Ctrl-C does,
    so the block's exit removes the file (inside, both raise :class:`ttt._interrupt.Interrupted`, which
    leaves the block as plain ``KeyboardInterrupt``); and SIGINT / SIGTERM arriving while the lock is
    taken or given back wait until that is done.
    """
    run = Path(run_dir)
    path, fd, created = run / LOCK_NAME, None, False
    with plain_interrupt(), _signals_raise():
        try:
            with _signals_deferred():
                created = not run.exists()
                try:
                    run.mkdir(parents=True, exist_ok=True)
                except OSError as e:
                    raise CheckpointError(
                        f"cannot create the run directory {run} ({e.strerror}); expected a folder this "
                        "process can create, e.g. under the working directory"
                    ) from None
                fd = _acquire_lock(path)
            yield run
        finally:
            with _signals_deferred():
                if fd is not None:
                    path.unlink(missing_ok=True)
                    os.close(fd)
                if created:
                    try:
                        run.rmdir()
                    except OSError:
                        pass  # not empty: the run wrote something


@contextmanager
def _signals_raise() -> Iterator[None]:
    """In the block, a SIGTERM left at its default action and a SIGINT left at Python's raise
    :class:`~ttt._interrupt.Interrupted` (a handler installed inside the block, like ``ttt train``'s, takes
    over until it restores these)."""
    import signal

    if not in_main_thread():
        yield
        return
    defaults = {signal.SIGTERM: signal.SIG_DFL, signal.SIGINT: signal.default_int_handler}
    previous = {s: signal.getsignal(s) for s in defaults}
    ours = [s for s, handler in previous.items() if handler is defaults[s]]
    for s in ours:
        signal.signal(s, raise_interrupted)
    try:
        yield
    finally:
        for s in ours:
            signal.signal(s, previous[s])


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM arriving while the block runs take effect at its end: their handlers then run as
    they would have (a default action is carried out). Python runs signal handlers in the main thread only,
    whichever thread the signal reached, so a recording handler there defers them all."""
    import signal

    if not in_main_thread():
        yield
        return
    caught: list[tuple[int, Any]] = []
    previous: dict[int, Any] = {}
    try:
        for s in (signal.SIGINT, signal.SIGTERM):
            previous[s] = signal.signal(s, lambda signum, frame: caught.append((signum, frame)))
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for signum, frame in caught:
            handler = previous[signum]
            if callable(handler):
                handler(signum, frame)
            elif handler in (signal.SIG_DFL, None):
                os.kill(os.getpid(), signum)


def _acquire_lock(path: Path) -> int:
    import fcntl

    while True:
        try:  # never through a link: the lock truncates its file, which must be the run's own
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise CheckpointError(_LINK_REFUSED.format(path=path)) from None
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise RunLocked(
                    f"{path.parent} is in use by another ttt train or convert (pid {holder}, see {path}); "
                    "wait for it to end or choose another --out (a lock left by a process that has ended is "
                    "taken over)"
                ) from None
            raise
        # the previous holder may have removed the file between our open and our lock: lock the new one
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


_LINK_REFUSED = (
    "{path} is a symbolic link: ttt writes only files of the run directory itself, never through a link "
    "(remove it)"
)


def refuse_links(run_dir: str | os.PathLike, outputs: tuple[str, ...]) -> None:
    """Raise :class:`CheckpointError` if a file that a run writes into ``run_dir`` (``outputs``: glob
    patterns) is a symbolic link: writing it would follow the link out of the run directory."""
    run = Path(run_dir)
    for p in sorted({p for pattern in outputs for p in run.glob(pattern)}):
        if p.is_symlink():
            raise CheckpointError(_LINK_REFUSED.format(path=p))


def clear_run(run_dir: str | os.PathLike, outputs: tuple[str, ...] = ()) -> list[Path]:
    """Delete the checkpoints of a run directory (``latest``, ``step-*``, leftover temporaries) and the
    files matching the glob patterns ``outputs``; return what was deleted.

    Only what ``ttt`` writes is deleted. If a ``step-*`` directory holds any other file, nothing at all
    is deleted and :class:`CheckpointError` names the file. A directory without ``ttt`` checkpoints
    (no ``latest``, no ``step-*``) is not a run: files matching ``outputs`` there are the user's and stay.
    Everything is first moved (renamed) into one hidden ``.trash-*`` directory, then that is deleted: a
    failed move puts back what moved, and a deletion cut short leaves only the trash (removed next time).
    """
    run = Path(run_dir)
    if not run.is_dir():
        return []
    steps = [p for _, p in sorted(_step_dirs(run))]
    foreign = [f for d in steps for f in sorted(d.iterdir()) if not _is_checkpoint_file(f.name)]
    if foreign:
        raise CheckpointError(
            f"{run} holds files that ttt did not write, inside its checkpoints: "
            f"{', '.join(str(f) for f in foreign[:5])}; move them away (nothing was deleted)"
        )
    temporaries = [*run.glob(".tmp-step-*"), *run.glob(".latest.*"), *run.glob(".trash-*")]
    latest = [run / "latest"] if (run / "latest").is_file() else []
    is_run = bool(latest or steps)
    files = sorted({p for pattern in outputs for p in run.glob(pattern) if p.is_file()}) if is_run else []
    victims = [*latest, *steps, *temporaries, *files]
    if not victims:
        return []
    trash = Path(tempfile.mkdtemp(dir=run, prefix=".trash-"))
    moved: list[Path] = []
    # 'latest' first: a removal cut short never leaves it pointing at a moved checkpoint
    try:
        for p in victims:
            os.replace(p, trash / f"{len(moved)}-{p.name}")
            moved.append(p)
    except OSError as e:
        for i, p in reversed(list(enumerate(moved))):
            os.replace(trash / f"{i}-{p.name}", p)
        trash.rmdir()
        raise CheckpointError(f"could not remove {victims[len(moved)]} ({e}); nothing was deleted") from e
    shutil.rmtree(trash, ignore_errors=True)
    return victims


def _is_checkpoint_file(name: str) -> bool:
    # .checkpoint.json.*: the temporary of an update_checkpoint_meta killed before its rename
    return name in CHECKPOINT_FILES or name.startswith(".checkpoint.json.")


def _dedupe(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Drop the second name of tensors that share storage (a tied head), which safetensors refuses."""
    seen: dict[int, str] = {}
    out = {}
    for k, v in state.items():
        ptr = v.data_ptr()
        if ptr in seen and v.numel() > 0:
            continue
        seen[ptr] = k
        out[k] = v
    return out


def find_checkpoint(path: str | os.PathLike) -> Path:
    """Resolve a run directory (via ``latest``) or a checkpoint directory to a checkpoint directory.

    ``latest`` must name a ``step-N`` directory of the run directory itself (no other path, no link
    that leads out of it): a run directory never sends its reader (or the files eval writes) elsewhere.
    """
    p = Path(path)
    if (p / "checkpoint.json").is_file() or _is_hf_dir(p):
        return p
    latest = p / "latest"
    if latest.is_file():
        with open(latest, "rb") as f:
            name = f.read(256).decode(errors="replace").strip()
        if step_of_dir(name) is None:
            raise CheckpointError(f"{latest} must name a step-N directory of {p}, but says {name[:60]!r}")
        target = p / name
        if not target.resolve().is_relative_to(p.resolve()):
            raise CheckpointError(f"{latest} names {target}, which leads out of {p} (a link): refused")
        if (target / "checkpoint.json").is_file():
            return target
        raise CheckpointError(f"{latest} points at {target.name}, which is not a complete checkpoint")
    if not p.exists():
        raise CheckpointError(f"no checkpoint at {p}: the path does not exist")
    steps = _step_dirs(p)
    if steps:
        raise CheckpointError(
            f"no checkpoint at {p}: it holds step-N directories but no 'latest' file; name one of them "
            f"(e.g. --checkpoint {max(steps)[1]})"
        )
    raise CheckpointError(f"no checkpoint at {p}: expected checkpoint.json or a 'latest' file")


def _read_meta(ckpt: Path) -> dict[str, Any]:
    """checkpoint.json of a checkpoint directory, checked (see :func:`validate_meta`)."""
    try:
        with open(ckpt / "checkpoint.json", "rb") as f:
            text = f.read(64 << 20)  # far above any real checkpoint.json (a BPE tokenizer is ~100 kB)
        meta = json.loads(text, parse_constant=_refuse_constant)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{ckpt}/checkpoint.json is unreadable or corrupted: {e}") from e
    validate_meta(meta, where=f"{ckpt}/checkpoint.json")
    return meta


def _refuse_constant(token: str) -> None:
    raise ValueError(f"{token} is not strict JSON")


def validate_meta(meta: Any, *, where: str = "checkpoint.json") -> None:
    """Check a checkpoint.json document before anything is built from it: its format, the digest of its
    content, and the type and range of every field this library reads. Raises :class:`CheckpointError`."""

    def fail(what: str) -> None:
        raise CheckpointError(f"{where}: {what}")

    if not isinstance(meta, dict):
        fail(f"expected a JSON object, got {type(meta).__name__}")
    if meta.get("format") != FORMAT:
        fail(f"not a {FORMAT} checkpoint (format {str(meta.get('format'))[:40]!r})")
    missing = [k for k in _META_REQUIRED if k not in meta]
    if missing:
        fail(f"missing fields {missing}")
    if meta["meta_sha256"] != _meta_digest(meta):
        fail("its content does not match its sha256 (the file was edited or corrupted)")
    if not _is_int(meta["step"]) or meta["step"] < 0:
        fail(f"'step' must be an integer >= 0, got {meta['step']!r}")
    hashes = meta["sha256"]
    if not isinstance(hashes, dict) or not all(isinstance(v, str) for v in hashes.values()):
        fail("'sha256' must map file names to hex digests")
    _validate_config(meta["config"], fail)
    for key, kind in (("tokenizer", dict), ("args", dict), ("history", dict), ("optimizer", dict)):
        if key in meta and not isinstance(meta[key], kind):
            fail(f"'{key}' must be a JSON object, got {type(meta[key]).__name__}")
    if "seconds" in meta and not (_is_number(meta["seconds"]) and meta["seconds"] >= 0):
        fail(f"'seconds' must be a number >= 0, got {meta['seconds']!r}")


def _validate_config(config: Any, fail: Any) -> None:
    from ttt.layers import MIXERS

    known = set(LMConfig.__dataclass_fields__)
    if not isinstance(config, dict) or set(config) - known:
        fail(f"'config' must be an LMConfig object; unknown fields {sorted(set(config) - known)[:5]}")
    for key, (low, high) in _CONFIG_INTS.items():
        value = config.get(key, 1)
        if key == "mlp_hidden" and value is None:
            continue
        if not _is_int(value) or not low <= value <= high:
            fail(f"config '{key}' must be an integer in [{low}, {high}], got {str(value)[:40]}")
    for key, low, high in (("norm_eps", 0.0, 1.0), ("init_std", 0.0, 10.0)):
        value = config.get(key, 0.5)
        if not _is_number(value) or not low < value <= high:
            fail(f"config '{key}' must be a number in ({low}, {high}], got {str(value)[:40]}")
    if not isinstance(config.get("tie_embeddings", True), bool):
        fail("config 'tie_embeddings' must be true or false")
    names = [config.get("mixer", "ttt_linear"), *(config.get("layer_mixers") or [])]
    if config.get("layer_mixers") is not None and not isinstance(config["layer_mixers"], list):
        fail("config 'layer_mixers' must be a list of mixer names or null")
    kwargs = config.get("mixer_kwargs", {})
    if not isinstance(kwargs, dict) or not all(isinstance(v, dict) for v in kwargs.values()):
        fail("config 'mixer_kwargs' must map mixer names to objects")
    unknown = [str(n)[:40] for n in [*names, *kwargs] if not isinstance(n, str) or n not in MIXERS]
    if unknown:
        fail(f"config names unknown mixers {unknown[:5]}")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def load_checkpoint(
    path: str | os.PathLike,
    *,
    load_trainer: bool = False,
) -> tuple[dict[str, Tensor], dict[str, Any], dict[str, Tensor] | None]:
    """Read and verify a checkpoint: ``(model_state, meta, trainer_tensors or None)``.

    ``meta`` has passed :func:`validate_meta`; the tensor files match their sha256.
    """
    from safetensors.torch import load_file

    ckpt = find_checkpoint(path)
    if not (ckpt / "checkpoint.json").is_file():  # find_checkpoint returned a HF directory
        if load_trainer:
            raise CheckpointError(f"{ckpt} is a HF model directory: it holds no training state to resume")
        return (*_load_hf_dir(ckpt), None)
    meta = _read_meta(ckpt)
    wanted = ["model.safetensors"] + (["trainer.safetensors"] if load_trainer else [])
    tensors = {}
    for fname in wanted:
        f = ckpt / fname
        if not f.is_file():
            resuming = fname == "trainer.safetensors"
            why = " (a model-only checkpoint cannot resume training)" if resuming else ""
            raise CheckpointError(f"{f} is missing{why}")
        if file_sha256(f) != meta["sha256"].get(fname):
            raise CheckpointError(f"{f} is truncated or corrupted: its sha256 does not match checkpoint.json")
        try:
            tensors[fname] = load_file(str(f))
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{f} cannot be read: {e}") from e
    return tensors["model.safetensors"], meta, tensors.get("trainer.safetensors")


def _is_hf_dir(p: Path) -> bool:
    """A directory written by ``TTTForCausalLM.save_pretrained`` (``model_type`` ``ttt_lm``), or one whose
    config.json cannot be read (loading it then says so, naming the file)."""
    if not (p / "config.json").is_file():
        return False
    try:
        return _read_hf_config(p).get("model_type") == "ttt_lm"
    except CheckpointError:
        return True


def _is_ttt_hf_dir(p: Path) -> bool:
    """A directory whose config.json reads as a ``ttt_lm`` model's (an unreadable one does not count)."""
    try:
        return (p / "config.json").is_file() and _read_hf_config(p).get("model_type") == "ttt_lm"
    except CheckpointError:
        return False


def _read_hf_config(p: Path) -> dict[str, Any]:
    """config.json of a HF directory as a JSON object (strict JSON, UTF-8), or :class:`CheckpointError`."""
    try:
        with open(p / "config.json", "rb") as f:
            doc = json.loads(f.read(64 << 20), parse_constant=_refuse_constant)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{p / 'config.json'} is unreadable or corrupted: {str(e)[:200]}") from e
    if not isinstance(doc, dict):
        raise CheckpointError(f"{p / 'config.json'}: expected a JSON object, got {type(doc).__name__}")
    return doc


def _hf_weight_files(p: Path) -> list[Path]:
    """The weight files transformers reads from ``p``: ``model.safetensors``, or the shards its
    ``model.safetensors.index.json`` names; none may lead out of ``p`` (a link)."""
    index = p / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_bytes())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index} is unreadable or corrupted: {str(e)[:200]}") from e
        if not all(isinstance(n, str) and n and Path(n).name == n for n in names):
            raise CheckpointError(f"{index} names files outside {p}: {names[:3]}")
        files = [p / n for n in names]
    elif (p / "model.safetensors").exists():
        files = [p / "model.safetensors"]
    else:
        raise CheckpointError(f"{p} holds no model.safetensors (nor model.safetensors.index.json)")
    for f in files:
        if not f.resolve().is_relative_to(p.resolve()):
            raise CheckpointError(f"{f} leads out of {p} (a link): refused")
    return files


def _load_hf_dir(p: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``(model_state, meta)`` of a HF ``ttt_lm`` directory, in the shape :func:`load_checkpoint` returns:
    the LMConfig fields of ``config.json`` (checked as checkpoint.json's config is) and the tokenizer of
    ``tokenizer.json`` (if any); no ``step``: the directory records none. The weights are the files
    transformers reads (:func:`_hf_weight_files`), nothing else in the directory."""
    import dataclasses

    from safetensors.torch import load_file

    hf = _read_hf_config(p)

    def fail(what: str) -> None:
        raise CheckpointError(f"{p / 'config.json'}: {what}")

    if hf.get("model_type") != "ttt_lm":
        got = str(hf.get("model_type"))[:40]
        fail(f"model_type must be 'ttt_lm' (a directory saved from a ttt model), got {got!r}")
    fields = {f.name for f in dataclasses.fields(LMConfig)}
    _validate_config({k: v for k, v in hf.items() if k in fields}, fail)
    try:
        config = LMConfig.from_dict({k: v for k, v in hf.items() if k in fields})
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{p / 'config.json'}: {e}") from e
    meta: dict[str, Any] = {"config": config.to_dict()}
    if (trained := hf.get("ttt_trained_on")) is not None:  # the run's text and context (from_ttt)
        corpus, context = (
            trained.get(k) if isinstance(trained, dict) else None for k in ("corpus", "context")
        )
        if not isinstance(corpus, str) or not corpus or type(context) is not int or context < 1:
            fail(
                'ttt_trained_on must be {"corpus": a name or path, "context": an int >= 1}, got '
                f"{trained!r:.80}"
            )
        meta["args"] = {"corpus": corpus, "context": context}
    if (p / "tokenizer.json").is_file():
        try:
            meta["tokenizer"] = {"kind": "bpe", "json": (p / "tokenizer.json").read_bytes().decode()}
        except (OSError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{p / 'tokenizer.json'} is unreadable or not UTF-8: {str(e)[:200]}") from e
    state: dict[str, Tensor] = {}
    for f in _hf_weight_files(p):
        try:
            tensors = load_file(str(f))
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{f} cannot be read: {str(e)[:200]}") from e
        state.update({k.removeprefix("model."): v for k, v in tensors.items()})
    return state, meta


def load_model(
    path: str | os.PathLike, *, device: str | torch.device = "cpu", expect: LMConfig | None = None
) -> tuple[Any, dict[str, Any]]:
    """Build a :class:`CausalLM` from a checkpoint: ``(model, meta)``.

    The model is first built on the ``meta`` device (no memory) and its tensor names and shapes are
    compared with the checkpoint's weights; only a model that fits them is built for real.
    ``expect``: raise :class:`CheckpointError` if the checkpoint's config differs from it.
    """
    from .lm import CausalLM

    state, meta, _ = load_checkpoint(path)
    try:
        config = LMConfig.from_dict(meta["config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"the checkpoint's config is invalid: {e}") from e
    if expect is not None and expect != config:
        raise CheckpointError(
            f"checkpoint config differs from the requested one: {config_diff(config, expect)}"
        )
    try:
        with torch.device("meta"):
            expected = CausalLM(config).state_dict()
    except (TypeError, ValueError) as e:  # a mixer refusing its mixer_kwargs
        raise CheckpointError(f"the checkpoint's config does not build a model: {e}") from e
    shapes = {k: tuple(v.shape) for k, v in expected.items()}
    floating = {k for k, v in expected.items() if v.is_floating_point()}
    _check_weights_fit(
        shapes, state, tied={"head.weight"} if config.tie_embeddings else set(), floating=floating
    )
    model = CausalLM(config)
    model.load_state_dict(state, strict=False)
    return model.to(device), meta


def _check_weights_fit(
    shapes: dict[str, tuple[int, ...]], state: dict[str, Tensor], tied: set[str], floating: set[str]
) -> None:
    """Names and shapes as the model's, floating-point weights where the model's are (an integer tensor
    would be cast in silently), and finite ones (a NaN failed later, deep inside a layer)."""
    missing = sorted(set(shapes) - set(state) - tied)
    unexpected = sorted(set(state) - set(shapes))
    wrong = [f"{k} {tuple(state[k].shape)} != {shapes[k]}" for k in shapes if k in state
             and tuple(state[k].shape) != shapes[k]]  # fmt: skip
    dtypes = [
        f"{k} {state[k].dtype}" for k in sorted(floating & set(state)) if not state[k].is_floating_point()
    ]
    if missing or unexpected or wrong or dtypes:
        raise CheckpointError(
            f"checkpoint weights do not fit the model of its config: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, other shapes {wrong[:5]}, other dtypes {dtypes[:5]}"
        )
    bad = [k for k in sorted(floating & set(state)) if not bool(torch.isfinite(state[k]).all())]
    if bad:
        raise CheckpointError(f"checkpoint weights hold NaN or Inf: {bad[:5]}")


def checkpoint_tokenizer(meta: dict[str, Any], vocab_size: int | None = None) -> Any:
    """The tokenizer stored in a checkpoint's meta, checked: every id it can produce is below
    ``vocab_size`` (the model's; default: the checkpoint config's). Raises :class:`CheckpointError`."""
    from ttt.data import tokenizer_from_dict

    if "tokenizer" not in meta:
        raise CheckpointError(
            "the checkpoint has no tokenizer (a ttt checkpoint keeps it in checkpoint.json, as ttt train "
            "writes it; a HF directory in tokenizer.json)"
        )
    try:
        tokenizer = tokenizer_from_dict(meta["tokenizer"])
    except Exception as e:  # tokenizers raises its own error types on a corrupt description
        raise CheckpointError(f"the checkpoint's tokenizer is corrupted: {str(e)[:200]}") from e
    vocab_size = vocab_size or meta["config"].get("vocab_size", 256)
    inner = getattr(tokenizer, "_tok", None)
    largest = max(inner.get_vocab().values(), default=-1) + 1 if inner is not None else tokenizer.vocab_size
    if max(largest, tokenizer.vocab_size) > vocab_size:
        raise CheckpointError(
            f"the checkpoint's tokenizer produces ids up to {max(largest, tokenizer.vocab_size) - 1}, "
            f"out of the model's vocabulary of {vocab_size}"
        )
    return tokenizer


def config_diff(a: LMConfig, b: LMConfig) -> str:
    """A short ``field: a != b`` list of the fields where two configs differ."""
    da, db = a.to_dict(), b.to_dict()
    return ", ".join(f"{k}: {da[k]!r} != {db[k]!r}" for k in da if da[k] != db[k]) or "(none)"
