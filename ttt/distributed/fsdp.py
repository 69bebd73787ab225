"""Sharded training with PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``) and sharded
checkpoints with ``torch.distributed.checkpoint`` (DCP).

Four pieces, each a collective (every rank calls it):

- :func:`shard_model`: optional activation checkpointing of every block, then ``fully_shard`` on every
  block and on the root (embedding, final norm and head, tied or not, live in the root's group), with
  an optional bfloat16 mixed-precision policy (parameters cast to bfloat16 for compute, gradients
  reduced in float32; the TTT inner loops stay float32 as the ops always run them).
- :func:`save_sharded` / :func:`load_sharded`: model and optimizer state (each rank writes its own
  shards) plus small replicated trainer state, in ``<run>/dcp/step-XXXXXXX``. The shards are written
  into a hidden ``.tmp-step-XXXXXXX`` directory; once every rank has finished, the sha256 of each file
  goes into its ``.complete`` marker (written atomically) and the directory is renamed into place, so a
  rank killed mid-save leaves the previous checkpoint as the latest (:func:`latest_sharded`) and no
  half-written step directory. Loading checks every file against its recorded sha256 first.
- :func:`full_model_state`: the whole, unsharded ``state_dict`` on rank 0 (for the usual safetensors
  checkpoint that ``ttt eval`` / ``ttt generate`` / ``from_pretrained`` read).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from ..models.checkpoint import CheckpointError, file_sha256, replace_dir, step_of_dir, write_text_atomic

__all__ = ["full_model_state", "latest_sharded", "load_sharded", "save_sharded", "shard_model"]

_COMPLETE = ".complete"
_TMP = ".tmp-step-"
_SHA256 = re.compile(r"[0-9a-f]{64}")


def shard_model(
    model: nn.Module,
    *,
    mixed_precision: bool = False,
    checkpoint_blocks: bool = False,
    mesh: Any = None,
) -> nn.Module:
    """Shard ``model`` (a module with ``.blocks``, e.g. ``ttt.models.CausalLM``) over the default group.

    Args:
        mixed_precision: compute in bfloat16 (FSDP casts the gathered parameters), reduce gradients
            and keep the sharded master weights in float32.
        checkpoint_blocks: recompute each block's activations in the backward (less memory, one more
            forward per block): sets the model's ``checkpoint_blocks``, which ``CausalLM`` has.
        mesh: a 1-d ``DeviceMesh``. Default: every rank of the default group.

    Returns:
        The same module, sharded in place (its parameters become ``DTensor`` shards). Build the
        optimizer after this call.
    """
    if not dist.is_initialized():
        raise RuntimeError("shard_model needs torch.distributed initialised (dist.init_process_group) first")
    if not hasattr(model, "blocks"):
        raise TypeError(
            f"shard_model expects a model with .blocks (e.g. CausalLM), got {type(model).__name__}"
        )
    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if mixed_precision
        else MixedPrecisionPolicy()
    )
    if checkpoint_blocks:  # the model recomputes each (sharded) block in the backward
        if not hasattr(model, "checkpoint_blocks"):
            raise TypeError(
                f"checkpoint_blocks=True needs a model with a checkpoint_blocks switch (e.g. CausalLM), got "
                f"{type(model).__name__}"
            )
        model.checkpoint_blocks = True
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def _step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:07d}"


def _complete(root: Path) -> list[Path]:
    """The complete sharded checkpoints (``step-N`` with their marker) under ``root``, oldest first."""
    done = [(step, p) for p in root.iterdir() if (step := step_of_dir(p.name)) is not None
            and (p / _COMPLETE).exists()]  # fmt: skip
    return [p for _, p in sorted(done)]


def latest_sharded(root: str | Path) -> Path | None:
    """The newest complete sharded checkpoint under ``root`` (``<run>/dcp``), or None."""
    root = Path(root)
    if not root.is_dir():
        return None
    done = _complete(root)
    return done[-1] if done else None


def save_sharded(
    root: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    extra: dict[str, Any] | None = None,
    *,
    keep: int = 2,
) -> Path:
    """Write ``<root>/step-XXXXXXX`` (collective): model and optimizer shards plus ``extra``.

    ``extra`` holds small replicated trainer state (tensors such as RNG states, and picklable values);
    every rank must pass the same. The files are written into ``<root>/.tmp-step-XXXXXXX``; once every
    rank has finished, their sha256 go into the ``.complete`` marker and the directory is renamed to
    ``step-XXXXXXX`` (a save that fails leaves no step directory). Older complete checkpoints beyond the
    newest ``keep`` are removed. ``root`` must not be a symbolic link (the shards would go elsewhere).
    """
    root = Path(root)
    if root.is_symlink():
        raise CheckpointError(f"{root} is a symbolic link: sharded checkpoints are never written through one")
    path, tmp, main = _step_dir(root, step), root / f"{_TMP}{step:07d}", dist.get_rank() == 0
    if main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.is_symlink():  # never written through
            tmp.unlink()
        shutil.rmtree(tmp, ignore_errors=True)  # a save of this step cut short before
    dist.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    try:
        dcp.save({"model": model_sd, "optim": optim_sd, "extra": dict(extra or {})}, checkpoint_id=tmp)
        dist.barrier()
        hashes = _hash_files(tmp, sorted(p.name for p in tmp.iterdir() if p.is_file()))
        if main:
            write_text_atomic(tmp / _COMPLETE, json.dumps({"step": step, "sha256": hashes}, indent=1) + "\n")
            replace_dir(tmp, path)  # the same step saved again: the earlier one is moved aside first
    except BaseException:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if main:
        for old in _complete(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        for stale in [*root.glob(f"{_TMP}*"), *root.glob(".step-*.old-*")]:  # left by saves cut short
            shutil.rmtree(stale, ignore_errors=True)
    dist.barrier()
    return path


def _hash_files(path: Path, names: list[str]) -> dict[str, str]:
    """``{name: sha256}`` of the files ``names`` of ``path`` (collective: each rank hashes its share)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    share = {name: file_sha256(path / name) for name in names[rank::world]}
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, share)
    return {name: digest for part in parts for name, digest in sorted(part.items())}


def _recorded_hashes(path: Path) -> dict[str, str] | None:
    """The sha256 of each file that the ``.complete`` marker of ``path`` records; None for a marker of a
    version that recorded none (it holds the step number only)."""
    marker = path / _COMPLETE
    text = marker.read_text(errors="replace")
    if text.strip().isdigit():
        return None
    try:
        doc = json.loads(text)
    except ValueError:
        doc = None
    hashes = doc.get("sha256") if isinstance(doc, dict) else None
    if not isinstance(hashes, dict) or not hashes or not all(map(_is_entry, hashes.items())):
        raise CheckpointError(f"{marker} is corrupted: expected the sha256 of each file of the checkpoint")
    return hashes


def _is_entry(item: tuple[Any, Any]) -> bool:
    """Whether a marker's ``name: sha256`` pair names a file of the checkpoint directory itself."""
    name, digest = item
    plain = isinstance(name, str) and "/" not in name and name not in ("", ".", "..")
    return plain and isinstance(digest, str) and _SHA256.fullmatch(digest) is not None


def _check_files(path: Path) -> None:
    """Refuse (:class:`CheckpointError` naming the file) a file of ``path`` that is missing or does not
    match the sha256 its marker records (collective: each rank reads its share of the files)."""
    hashes = _recorded_hashes(path)
    if hashes is None:
        return
    rank, world = dist.get_rank(), dist.get_world_size()
    bad = []
    for name in sorted(hashes)[rank::world]:
        file = path / name
        if not file.is_file() or file.is_symlink():
            bad.append(f"{file} is missing (its sha256 is recorded in {path / _COMPLETE})")
        elif file_sha256(file) != hashes[name]:
            bad.append(f"{file} does not match its sha256 in {path / _COMPLETE} (corrupted or changed)")
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, bad)
    found = [b for part in parts for b in part]
    if found:
        raise CheckpointError(found[0] + (f" (and {len(found) - 1} more)" if len(found) > 1 else ""))


def load_sharded(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    extra_like: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_sharded` into the sharded ``model`` and ``optimizer``
    (collective; any number of ranks), once every file matches the sha256 its marker records
    (:class:`~ttt.models.checkpoint.CheckpointError` names a corrupt one). Returns the ``extra`` dict;
    ``extra_like`` names its keys (tensor values give the shapes)."""
    path = Path(path)
    if not (path / _COMPLETE).exists():
        raise FileNotFoundError(f"{path} is not a complete sharded checkpoint (no {_COMPLETE} marker)")
    _check_files(path)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd, "extra": dict(extra_like or {})}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return state["extra"]


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded ``state_dict`` on CPU, on rank 0 (an empty dict on the others). Collective.

    A parameter registered under two names (a head tied to the embedding) is kept under its first name
    only, as ``ttt.models.checkpoint.save_checkpoint`` stores it.
    """
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    for aliases in names.values():
        for name in aliases[1:]:
            state.pop(name, None)
    return state
