"""``ttt ls``: the mixers, model presets and corpora that the other commands accept, and the checkpoints
under a runs directory with their sizes on disk."""

from __future__ import annotations

from pathlib import Path

from ttt.recipes.args import LsArgs
from ttt.recipes.common import counted

EPILOG = """examples:
  ttt ls
  ttt ls --runs /data/my_runs     # checkpoints written elsewhere (ttt train --out /data/my_runs/...)
"""
HELP = "list mixers, presets, corpora and checkpoints with their sizes"
ARGS = LsArgs


def human_bytes(n: int) -> str:
    """``1536`` -> ``'1.5 KiB'``: bytes in powers of 1024, three significant digits."""
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    value, i = float(n), 0
    while value >= 1024 and i < len(units) - 1:
        value, i = value / 1024, i + 1
    if i == 0:
        return f"{n} B"
    return f"{value:.3g} {units[i]}" if value < 1000 else f"{value:.0f} {units[i]}"


def human_count(n: int) -> str:
    """``885888`` -> ``'886K'``; ``1214875648`` -> ``'1.21B'``."""
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.3g}{suffix}"
    return str(n)


def checkpoints(root: Path) -> list[tuple[Path, dict, int, int]]:
    """``(directory, checkpoint.json, total bytes, model bytes)`` of every complete checkpoint under
    ``root``, sorted by path: ttt checkpoints and the HF model directories of ``ttt convert`` /
    ``save_pretrained`` (whose meta is ``{"hf": config.json}``). Runs reached through a symbolic link are
    followed (each directory once); hidden temporaries of an interrupted save are left out."""
    import json

    from ttt.models.checkpoint import CheckpointError, _hf_weight_files, _read_hf_config

    found = []
    for ckpt in _model_dirs(root):
        if (ckpt / "checkpoint.json").is_file():
            try:
                meta = json.loads((ckpt / "checkpoint.json").read_text())
            except (OSError, ValueError):
                meta = {}
            model = ckpt / "model.safetensors"
            weights = [model] if model.is_file() else []
        else:
            meta = {"hf": _read_hf_config(ckpt)}  # readable: _model_dirs found it a ttt_lm config
            try:
                weights = [w for w in _hf_weight_files(ckpt) if w.is_file()]
            except CheckpointError:  # flagged by damage()
                weights = []
        files = [f for f in ckpt.iterdir() if f.is_file()]
        found.append(
            (ckpt, meta, sum(f.stat().st_size for f in files), sum(w.stat().st_size for w in weights))
        )
    return found


def _model_dirs(root: Path) -> list[Path]:
    """Directories under ``root`` (not hidden, links followed, each real directory once) holding a
    checkpoint.json or a HF config.json of ``model_type`` ``ttt_lm``, sorted."""
    import os

    from ttt.models.checkpoint import _is_ttt_hf_dir

    found, seen = [], set()
    for top, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(top)
        if real in seen:  # a link back into the tree: walked already
            dirs.clear()
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if "checkpoint.json" in files:
            found.append(Path(top))
        elif "config.json" in files and _is_ttt_hf_dir(Path(top)):
            found.append(Path(top))
    return sorted(found)


def damage(ckpt: Path, meta: dict) -> list[str]:
    """What is visibly wrong with a checkpoint, cheaply (no hashing: ``ttt eval`` and ``--resume`` check
    the sha256): an unreadable ``checkpoint.json``, a listed file missing, or a safetensors file whose size
    differs from what its own header describes (a truncated copy or an interrupted transfer); and whatever
    makes ``ttt eval`` refuse its checkpoint.json (an edited file no longer matches its digest)."""
    from ttt.models.checkpoint import CheckpointError, step_of_dir, validate_meta

    if "hf" in meta:
        return _hf_damage(ckpt)
    if not meta:
        return ["checkpoint.json unreadable"]
    found = []
    try:
        validate_meta(meta, where="checkpoint.json")
    except CheckpointError as e:
        found.append(str(e)[:120])
    named = step_of_dir(ckpt.name)
    if named is not None and meta.get("step") != named:
        found.append(f"the directory is named step {named} but holds step {meta.get('step')}")
    return found + _file_damage(ckpt, sorted(meta.get("sha256") or {}))


def _hf_damage(ckpt: Path) -> list[str]:
    """What is visibly wrong with a HF model directory: weights that transformers would not find, or
    whose size differs from what their headers describe."""
    from ttt.models.checkpoint import CheckpointError, _hf_weight_files

    try:
        weights = _hf_weight_files(ckpt)
    except CheckpointError as e:
        return [str(e)[:120]]
    return _file_damage(ckpt, [w.name for w in weights])


def _file_damage(ckpt: Path, names: list[str]) -> list[str]:
    found = []
    for name in names:
        f = ckpt / name
        if not f.is_file():
            found.append(f"{name} missing")
        elif name.endswith(".safetensors"):
            size, expected = f.stat().st_size, _safetensors_size(f)
            if expected is None or size < expected:
                found.append(f"{name} truncated")
            elif size > expected:
                found.append(f"{name} longer than its header says")
    return found


def _safetensors_size(f: Path) -> int | None:
    """The size a safetensors file's own header gives it (8 + header + data), or None when the header
    cannot be read: a file cut inside it, or no safetensors file at all (e.g. a Git LFS pointer)."""
    import json
    import struct

    try:
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > f.stat().st_size - 8:
                return None
            header = json.loads(fh.read(n))
        tensors = [v for k, v in header.items() if k != "__metadata__"]
        return 8 + n + max((int(v["data_offsets"][1]) for v in tensors), default=0)
    except (OSError, ValueError, struct.error, KeyError, TypeError, IndexError, AttributeError):
        return None


def run(args: LsArgs) -> int:
    import torch

    from ttt.data import CORPORA
    from ttt.layers import MIXERS
    from ttt.models import PRESETS, LMConfig
    from ttt.models.checkpoint import step_of_dir

    root = Path(args.runs)
    if root.exists() and not root.is_dir():
        raise ValueError(f"--runs {root} is a file; expected a directory of run directories")
    if not root.exists() and root != Path(LsArgs.runs):  # a typo'd path, not the default before any run
        raise ValueError(f"--runs {root} does not exist; expected a directory of run directories")
    print("mixers:  " + ", ".join(sorted(MIXERS)))
    print("presets (parameters: the attention model on bytes; ttt train sizes every mixer's model to it):")
    from ttt.recipes.args import TrainArgs
    from ttt.recipes.train import train_mixer_kwargs

    kwargs = train_mixer_kwargs(TrainArgs(mixer="attention"))  # the attention model ttt train builds
    with torch.device("meta"):  # counts parameters without allocating them
        configs = {name: LMConfig.from_name(name, mixer="attention", vocab_size=256, mixer_kwargs=kwargs)
                   for name in PRESETS}  # fmt: skip
        counts = {name: config.num_params() for name, config in configs.items()}
    for name, p in PRESETS.items():
        print(
            f"  {name:6} {human_count(counts[name]):>6} params  dim {p['dim']:5}  layers {p['n_layers']:3}"
            f"  heads {p['n_heads']:3}  mlp {p['mlp_hidden']:5}  max_seq_len {p['max_seq_len']}"
        )
    print("corpora: " + ", ".join(sorted(CORPORA)) + ", or a path to a text file / directory")
    found = checkpoints(root) if root.is_dir() else []
    if not found:
        print(f"checkpoints: none under {root} (ttt train writes them there; --runs DIR looks elsewhere)")
        return 0
    print(f"checkpoints under {root} (size on disk: all files, and the model weights alone):")
    width = max(len(str(c)) for c, *_ in found)
    # each run's `latest`, read once: it tags a checkpoint below, or is flagged when it names none
    runs = sorted({ckpt.parent for ckpt, *_ in found})
    latest = {r: (r / "latest").read_text(errors="replace").strip() for r in runs if (r / "latest").is_file()}
    for ckpt, meta, total, model in found:
        is_latest = latest.get(ckpt.parent) == ckpt.name
        mixer = (meta.get("hf") or meta.get("config", {})).get("mixer", "?")
        what = "HF model" if "hf" in meta else f"step {meta.get('step', '?')}"
        print(
            f"  {str(ckpt):{width}}  {human_bytes(total):>9}  (model {human_bytes(model)})  {what}"
            f"  {mixer}" + ("  [latest]" if is_latest else "") + (
                f" [damaged: {', '.join(bad)}]" if (bad := damage(ckpt, meta)) else "")
        )  # fmt: skip
    names = {(ckpt.parent, ckpt.name) for ckpt, *_ in found}
    for run_dir, name in latest.items():
        if (run_dir, name) not in names:
            print(
                f"  {run_dir / 'latest'} names {name}, which is not a checkpoint of the run: ttt eval and "
                "--resume refuse the run until it names one of the steps above"
            )
    for run_dir in runs:
        steps = [c for c, *_ in found if c.parent == run_dir and step_of_dir(c.name) is not None]
        if run_dir not in latest and steps:
            print(f"  {run_dir} has no 'latest': ttt eval and --resume refuse the run; name a step directory")
    print(f"  total {human_bytes(sum(t for _, _, t, _ in found))} in {counted(len(found), 'checkpoint')}")
    return 0
