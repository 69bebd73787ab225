"""Atomic checkpoints: safetensors for tensors, one JSON for the config and everything else.

Layout of a run directory::

    out/
      latest                       # text: name of the newest complete checkpoint ("step-000300")
      step-000300/
        model.safetensors          # model weights
        trainer.safetensors        # optimizer moments, RNG states (training checkpoints only)
        checkpoint.json            # LMConfig, tokenizer, step, scalars, sha256 of both tensor files

A checkpoint is written into a hidden temporary directory, fsynced, renamed into place (atomic on
POSIX), and only then is ``latest`` replaced (temp file + ``os.replace``). A process killed at any
moment therefore leaves ``latest`` pointing at a complete checkpoint. Loading verifies the hashes, so
a truncated or corrupted file gives a clear error instead of silently wrong weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .config import LMConfig

__all__ = [
    "CheckpointError",
    "clear_run",
    "find_checkpoint",
    "load_checkpoint",
    "load_model",
    "save_checkpoint",
    "update_checkpoint_meta",
    "write_text_atomic",
]

FORMAT = "ttt-checkpoint-1"
# the files save_checkpoint writes into a checkpoint directory
CHECKPOINT_FILES = frozenset({"model.safetensors", "trainer.safetensors", "checkpoint.json"})
_STEP_DIR = re.compile(r"step-(\d+)")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupted, or belongs to another configuration."""


def _sha256(path: Path) -> str:
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


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a text file so that readers see the old or the new content, never a part of it."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.fchmod(fd, 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
        meta: JSON-serialisable extras (tokenizer, training arguments, optimizer scalars, losses).
        trainer_tensors: optimizer moments and RNG states, flattened to ``name -> tensor``.
        keep: how many checkpoints to keep: this one and the ``keep - 1`` newest of lower step;
            checkpoints of a higher step (left by a run resumed from an older one) are never pruned.

    Returns:
        the checkpoint directory.
    """
    from safetensors.torch import save_file

    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:06d}"
    tmp = Path(tempfile.mkdtemp(dir=run, prefix=f".tmp-{name}-"))
    os.chmod(tmp, 0o755)
    files = {"model.safetensors": _dedupe(model_state)}
    if trainer_tensors is not None:
        files["trainer.safetensors"] = trainer_tensors
    hashes = {}
    for fname, tensors in files.items():
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / fname))
        os.chmod(tmp / fname, 0o644)
        _fsync(tmp / fname)
        hashes[fname] = _sha256(tmp / fname)
    doc = {"format": FORMAT, "step": step, "config": config.to_dict(), "sha256": hashes, **(meta or {})}
    (tmp / "checkpoint.json").write_text(json.dumps(doc, indent=1))
    _fsync(tmp / "checkpoint.json")
    final = run / name
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    write_text_atomic(run / "latest", name + "\n")
    older = sorted((s, p) for s, p in _step_dirs(run) if s < step)
    for _, old in older[: max(0, len(older) - keep + 1)] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for stale in run.glob(".tmp-step-*"):
        if stale != tmp:
            shutil.rmtree(stale, ignore_errors=True)
    return final


def _step_dirs(run: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of the ``step-<digits>`` directories of a run directory."""
    found = []
    for p in run.glob("step-*"):
        m = _STEP_DIR.fullmatch(p.name)
        if m and p.is_dir():
            found.append((int(m[1]), p))
    return found


def update_checkpoint_meta(ckpt_dir: str | os.PathLike, **fields: Any) -> None:
    """Replace top-level fields of a checkpoint's ``checkpoint.json`` (atomically; tensors unchanged)."""
    path = Path(ckpt_dir) / "checkpoint.json"
    doc = json.loads(path.read_text())
    reserved = {"format", "step", "config", "sha256"} & set(fields)
    if reserved:
        raise ValueError(f"cannot update {sorted(reserved)} of a checkpoint")
    write_text_atomic(path, json.dumps({**doc, **fields}, indent=1))


def clear_run(run_dir: str | os.PathLike, outputs: tuple[str, ...] = ()) -> list[Path]:
    """Delete the checkpoints of a run directory (``latest``, ``step-*``, leftover temporaries) and the
    files matching the glob patterns ``outputs``; return what was deleted.

    Only what ``ttt`` writes is deleted. If a ``step-*`` directory holds any other file, nothing at all
    is deleted and :class:`CheckpointError` names the file. A directory without ``ttt`` checkpoints
    (no ``latest``, no ``step-*``) is not a run: files matching ``outputs`` there are the user's and stay.
    """
    run = Path(run_dir)
    if not run.is_dir():
        return []
    steps = [p for _, p in sorted(_step_dirs(run))]
    foreign = [f for d in steps for f in sorted(d.iterdir()) if f.name not in CHECKPOINT_FILES]
    if foreign:
        raise CheckpointError(
            f"{run} holds files that ttt did not write, inside its checkpoints: "
            f"{', '.join(str(f) for f in foreign[:5])}; move them away (nothing was deleted)"
        )
    temporaries = [*run.glob(".tmp-step-*"), *run.glob(".latest.*")]
    latest = [run / "latest"] if (run / "latest").is_file() else []
    is_run = bool(latest or steps)
    files = sorted({p for pattern in outputs for p in run.glob(pattern) if p.is_file()}) if is_run else []
    # 'latest' first: a removal cut short never leaves it pointing at a deleted checkpoint
    removed = []
    for p in [*latest, *steps, *temporaries, *files]:
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()
        removed.append(p)
    return removed


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
    """Resolve a run directory (via ``latest``) or a checkpoint directory to a checkpoint directory."""
    p = Path(path)
    if (p / "checkpoint.json").is_file() or _is_hf_dir(p):
        return p
    latest = p / "latest"
    if latest.is_file():
        target = p / latest.read_text().strip()
        if (target / "checkpoint.json").is_file():
            return target
        raise CheckpointError(f"{latest} points at {target.name}, which is not a complete checkpoint")
    if not p.exists():
        raise CheckpointError(f"no checkpoint at {p}: the path does not exist")
    raise CheckpointError(f"no checkpoint at {p}: expected checkpoint.json or a 'latest' file")


def load_checkpoint(
    path: str | os.PathLike,
    *,
    load_trainer: bool = False,
) -> tuple[dict[str, Tensor], dict[str, Any], dict[str, Tensor] | None]:
    """Read and verify a checkpoint: ``(model_state, meta, trainer_tensors or None)``."""
    from safetensors.torch import load_file

    ckpt = find_checkpoint(path)
    if _is_hf_dir(ckpt) and not (ckpt / "checkpoint.json").is_file():
        if load_trainer:
            raise CheckpointError(f"{ckpt} is a HF model directory: it holds no training state to resume")
        return (*_load_hf_dir(ckpt), None)
    try:
        meta = json.loads((ckpt / "checkpoint.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{ckpt}/checkpoint.json is unreadable or corrupted: {e}") from e
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{ckpt} is not a ttt checkpoint (format {meta.get('format')!r})")
    wanted = ["model.safetensors"] + (["trainer.safetensors"] if load_trainer else [])
    tensors = {}
    for fname in wanted:
        f = ckpt / fname
        if not f.is_file():
            raise CheckpointError(f"{f} is missing (a model-only checkpoint cannot resume training)")
        if _sha256(f) != meta.get("sha256", {}).get(fname):
            raise CheckpointError(f"{f} is truncated or corrupted: its sha256 does not match checkpoint.json")
        try:
            tensors[fname] = load_file(str(f))
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{f} cannot be read: {e}") from e
    return tensors["model.safetensors"], meta, tensors.get("trainer.safetensors")


def _is_hf_dir(p: Path) -> bool:
    """A directory written by ``TTTForCausalLM.save_pretrained`` (``model_type`` ``ttt_lm``)."""
    try:
        return json.loads((p / "config.json").read_text()).get("model_type") == "ttt_lm"
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


def _load_hf_dir(p: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``(model_state, meta)`` of a HF ``ttt_lm`` directory, in the shape :func:`load_checkpoint` returns:
    the LMConfig fields of ``config.json``, the tokenizer of ``tokenizer.json`` (if any), step 0."""
    import dataclasses

    from safetensors.torch import load_file

    hf = json.loads((p / "config.json").read_text())
    fields = {f.name for f in dataclasses.fields(LMConfig)}
    config = LMConfig.from_dict({k: v for k, v in hf.items() if k in fields})
    meta: dict[str, Any] = {"step": 0, "config": config.to_dict()}
    if (p / "tokenizer.json").is_file():
        meta["tokenizer"] = {"kind": "bpe", "json": (p / "tokenizer.json").read_text()}
    state: dict[str, Tensor] = {}
    for f in sorted(p.glob("*.safetensors")):
        state.update({k.removeprefix("model."): v for k, v in load_file(str(f)).items()})
    if not state:
        raise CheckpointError(f"{p} holds no *.safetensors weights")
    return state, meta


def load_model(
    path: str | os.PathLike, *, device: str | torch.device = "cpu", expect: LMConfig | None = None
) -> tuple[Any, dict[str, Any]]:
    """Build a :class:`CausalLM` from a checkpoint: ``(model, meta)``.

    ``expect``: raise :class:`CheckpointError` if the checkpoint's config differs from it.
    """
    from .lm import CausalLM

    state, meta, _ = load_checkpoint(path)
    config = LMConfig.from_dict(meta["config"])
    if expect is not None and expect != config:
        raise CheckpointError(
            f"checkpoint config differs from the requested one: {config_diff(config, expect)}"
        )
    model = CausalLM(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"head.weight"} if config.tie_embeddings else set()
    if set(missing) - tied or unexpected:
        raise CheckpointError(
            f"checkpoint weights do not fit the model: missing {sorted(set(missing) - tied)}, "
            f"unexpected {sorted(unexpected)}"
        )
    return model.to(device), meta


def config_diff(a: LMConfig, b: LMConfig) -> str:
    """A short ``field: a != b`` list of the fields where two configs differ."""
    da, db = a.to_dict(), b.to_dict()
    return ", ".join(f"{k}: {da[k]!r} != {db[k]!r}" for k in da if da[k] != db[k]) or "(none)"
