"""Small helpers shared by the recipes: device choice, distributed set-up, losses, plots."""

from __future__ import annotations

import functools
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "Dist",
    "check_number",
    "counted",
    "lm_loss",
    "resolve_device",
    "save_plot",
    "set_threads",
    "setup_dist",
    "with_threads",
]


def parse_mixer_kwargs(text: str | None) -> dict[str, dict[str, Any]]:
    """``--mixer-kwargs`` JSON -> ``{mixer name: {argument: value}}`` (``LMConfig.mixer_kwargs``), checked:
    each name is a mixer and each argument one it takes (:func:`ttt.layers.check_mixer_kwargs`)."""
    import json

    from ttt.layers import MIXERS, check_mixer_kwargs

    if not text:
        return {}
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(
            f'--mixer-kwargs must be JSON, e.g. \'{{"ttt_linear": {{"share_qk": true}}}}\': {e}'
        ) from None
    if not isinstance(parsed, dict) or not all(isinstance(v, dict) for v in parsed.values()):
        raise ValueError("--mixer-kwargs must map mixer names to objects of arguments, e.g. "
                         "'{\"ttt_linear\": {\"share_qk\": true}}'")  # fmt: skip
    unknown = sorted(set(parsed) - set(MIXERS))
    if unknown:
        raise ValueError(f"--mixer-kwargs names unknown mixers {unknown}; choose from {sorted(MIXERS)}")
    for name, kwargs in parsed.items():
        check_mixer_kwargs(name, kwargs)
    return parsed


def check_number(
    flag: str, value: float, *, above: float | None = None, least: float = 0.0, hint: str = ""
) -> None:
    """Refuse (one-line ``ValueError``) a command-line number that is not finite, or not ``> above`` (when
    given) / ``>= least``: e.g. ``--lr must be a finite number > 0, got inf``."""
    import math

    if above is not None:
        fine, bound = value > above, f"> {above:g}"
    else:
        fine, bound = value >= least, f">= {least:g}"
    if not (math.isfinite(value) and fine):
        raise ValueError(f"{flag} must be a finite number {bound}{hint}, got {value}")


def check_skip_spikes(flag: str, value: float) -> None:
    """Refuse (one line) a spike-skipping multiple (``TrainLoop.skip_spikes``) other than 0 or one > 1."""
    check_number(flag, value, least=0)
    if 0 < value <= 1:
        raise ValueError(
            f"{flag} {value:g}: expected 0 (never skip) or a multiple of the median gradient norm above 1 "
            "(at most 1 would skip about every other step)"
        )


def check_seed(value: int) -> None:
    """Refuse (one-line ``ValueError``) a ``--seed`` torch's generators cannot take."""
    if not 0 <= value < 2**63:
        raise ValueError(f"--seed must be an integer in [0, 2**63), got {value}")


#: the values of --dtype (ttt train, ttt convert): the weights and the optimizer stay float32 either way
DTYPES = ("float32", "bfloat16")


def check_dtype(value: str) -> None:
    """Refuse (one-line ``ValueError``) a ``--dtype`` other than those of :data:`DTYPES`."""
    if value not in DTYPES:
        raise ValueError(f"--dtype must be 'float32' or 'bfloat16' (autocast), got {value!r}")


def autocast(device: torch.device, dtype: str) -> torch.autocast:
    """The context of a training forward under ``--dtype``: ``torch.autocast`` to bfloat16 on ``device``
    for 'bfloat16' (matmuls in bfloat16; the TTT and delta-rule inner loops keep float32), a disabled one
    for 'float32'."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")


def resolve_device(name: str) -> torch.device:
    """``'auto'`` -> CUDA when present, else CPU; anything else is checked."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:  # an unknown device type
        raise ValueError(
            f"--device {name!r}: expected 'auto', 'cpu', 'cuda' or 'cuda:N' (or another torch device type, "
            "e.g. 'mps')"
        ) from None
    if device.type == "meta":
        raise ValueError(
            f"--device {name!r}: the meta device holds no data, nothing runs on it; expected 'auto', 'cpu', "
            "'cuda' or 'cuda:N'"
        )
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def set_threads(threads: int | None, device: torch.device | None = None) -> None:
    """Set torch's CPU threads: ``threads``, else 1 when the work runs on a CPU (``device`` None or a CPU);
    on a GPU torch's own choice stands.

    Every command's default: on this project's shared 2-core machine two threads ran the tiny models 8-17x
    slower than one (docs/cli.md, "Threads"); pass more for a larger model on cores of its own."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be >= 1, got {threads}")
        limit = 4 * (os.cpu_count() or 1)  # torch crashed (a segfault, no message) at 100,000 threads
        if threads > limit:
            raise ValueError(
                f"--threads {threads} is more than 4 per CPU of this machine (1..{limit}); more threads than "
                "cores only slow a run down"
            )
        torch.set_num_threads(threads)
    elif device is None or device.type == "cpu":
        torch.set_num_threads(1)


def with_threads(fn: Callable) -> Callable:
    """A recipe ``fn(args, ...)`` runs with ``args.threads`` CPU threads (:func:`set_threads`, on the device
    ``args.device`` names when it has one) and gives the caller's count back when it returns: a notebook
    that set 8 threads keeps them after ``evaluate_checkpoint``. The one place a recipe sets threads."""

    @functools.wraps(fn)
    def wrapper(args: Any, *rest: Any, **kwargs: Any) -> Any:
        before = torch.get_num_threads()
        try:
            device = getattr(args, "device", None)
            set_threads(args.threads, None if device is None else resolve_device(device))
            return fn(args, *rest, **kwargs)
        finally:
            torch.set_num_threads(before)

    return wrapper


@dataclass
class Dist:
    """Where this process sits in a ``torchrun`` launch (world 1 without one)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False
    """True when :func:`setup_dist` created the process group (and the recipe should destroy it)"""

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_dist(device: torch.device, need_group: bool = False) -> Dist:
    """Initialise ``torch.distributed`` when launched by ``torchrun`` (gloo on CPU, NCCL on CUDA); with
    ``need_group`` (FSDP), a one-process group when launched without it, so one command runs anywhere."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not need_group:
        return Dist()
    import tempfile

    import torch.distributed as dist

    owns = not dist.is_initialized()
    backend = "nccl" if device.type == "cuda" else "gloo"
    if owns and world <= 1:  # a rendezvous file of its own: no port to pick, nothing left behind
        with tempfile.NamedTemporaryFile(prefix="ttt-rendezvous-") as f:
            dist.init_process_group(backend=backend, init_method=f"file://{f.name}", rank=0, world_size=1)
    elif owns:
        dist.init_process_group(backend=backend)
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), owns)


def lm_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean next-token cross-entropy in nats: ``logits [B, T, V]``, ``targets [B, T]``."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def save_plot(
    path: str | os.PathLike,
    series: dict[str, tuple[list[float], list[float]]],
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    logx: bool = False,
) -> bool:
    """Line plot of ``{label: (x, y)}`` to a PNG; returns False (and writes nothing) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    many = len(series) > 6  # then the legend goes beside the axes, and markers tell repeated colours apart
    fig, ax = plt.subplots(figsize=(8, 4) if many else (6, 4), dpi=120)
    for i, (label, (xs, ys)) in enumerate(series.items()):
        marker = "osD^vPX"[i // 10 % 7] if many else "o"
        ax.plot(xs, ys, label=label, marker=marker if len(xs) < 30 else None, markersize=5 if many else 3)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    if logx:
        ax.set_xscale("log", base=2)
    ax.grid(alpha=0.3)
    if many:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    else:
        ax.legend()
    fig.tight_layout()
    save_figure(fig, path)
    return True


def save_figure(fig: Any, path: str | os.PathLike) -> None:
    """Save a matplotlib figure as a PNG at ``path`` and close it: into a fresh temporary (never an existing
    name, which could be a link out of the directory), then renamed into place."""
    import matplotlib.pyplot as plt

    fd, tmp = tempfile.mkstemp(dir=Path(path).parent, prefix=f".{Path(path).name}.", suffix=".png")
    os.chmod(fd, 0o644)  # mkstemp's 0600 would make the plot the one output others cannot read
    os.close(fd)
    try:
        fig.savefig(tmp)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)


def trained_corpus(meta: dict[str, Any]) -> str:
    """The corpus a checkpoint was trained on (``shakespeare`` when it records none). A relative path, as
    runs before paths were recorded absolute stored one, is refused: read from here it could name another
    text."""
    from ttt.data import CORPORA

    corpus = str(meta.get("args", {}).get("corpus", "shakespeare"))
    if corpus not in CORPORA and not os.path.isabs(corpus):
        raise ValueError(
            f"the checkpoint names its corpus by the relative path {corpus!r}, which depends on the "
            "directory ttt runs in (an earlier ttt train recorded it so); give the text itself (eval: "
            "--corpus PATH or --file PATH; generate: --prompt or --prompt-file)"
        )
    return corpus


@contextmanager
def reserved_stem(out: Path, stem: str, names: Callable[[str], list[str]]) -> Iterator[str]:
    """``stem``, else ``stem-2``, ``stem-3``, ...: the first name for which no file of ``names(stem)`` is in
    ``out`` (a link counts, even a broken one) and no other run holds it, held until the ``with`` block ends.

    So a command's results never replace earlier ones, nor those of a run writing into the same folder at
    the same moment, nor are written through a link. The hold is a hidden marker ``.<stem>.reserved``
    created exclusively (``O_EXCL``) and removed on leaving; the names are checked again once it is held,
    since a run that has just finished has written its files before letting its marker go.
    """

    def taken(candidate: str) -> bool:
        return any(os.path.lexists(out / name) for name in names(candidate))

    candidate, n = stem, 1
    while True:
        marker = out / f".{candidate}.reserved"
        if not taken(candidate):
            try:
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            except FileExistsError:
                pass  # another run holds this name
            else:
                if not taken(candidate):
                    break
                marker.unlink()
        n += 1
        candidate = f"{stem}-{n}"
    try:
        yield candidate
    finally:
        marker.unlink(missing_ok=True)


def refuse_run_in_corpus(run_dir: Path, corpus: str) -> None:
    """Refuse a run directory that is, or lies inside, the corpus directory (by any path to it): the run's
    files would join the corpus (read as training and held-out text), which then holds a ttt run and is
    refused by every later command (train and convert)."""
    if not os.path.isdir(corpus):
        return
    where, home = run_dir.resolve(), Path(corpus).resolve()
    if where == home or home in where.parents:
        raise ValueError(
            f"--out {run_dir} is {'the' if where == home else 'inside'} --corpus directory {corpus}: the "
            "run's files would become part of the corpus; expected an --out outside it"
        )


def check_same_corpus(recorded: Any, name: str, now: str) -> None:
    """A resumed run must train on the text it began with: refuse (``CheckpointError``) the corpus ``name``
    whose fingerprint ``now`` (:meth:`ttt.data.Corpus.sha256`) differs from the one its checkpoint
    ``recorded`` (None: a checkpoint from before fingerprints were recorded, not checked)."""
    from ttt.models.checkpoint import CheckpointError

    if recorded is None:
        return
    if recorded != now:
        raise CheckpointError(
            f"cannot resume: the text of --corpus {name} differs from what the run trained on (sha256 "
            f"{str(recorded)[:12]} then, {now[:12]} now): restore that text, or start a new run with another "
            "--out"
        )


def counted(n: int, noun: str) -> str:
    """``"1 checkpoint"``, ``"2 checkpoints"``: a count and its noun in the right number (nouns that take
    an ``s``)."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def format_table(header: list[str], rows: list[list[Any]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """An optimizer's state as ``({"optim.<param>.<name>": tensor}, {"param_groups": ...})``: tensors for a
    safetensors file, the rest for JSON (checkpoints)."""
    sd = opt.state_dict()
    tensors = {f"optim.{i}.{k}": v for i, st in sd["state"].items() for k, v in st.items()}
    return tensors, {"param_groups": sd["param_groups"]}


def load_optimizer_tensors(
    opt: torch.optim.Optimizer, tensors: dict[str, Tensor], meta: dict[str, Any]
) -> None:
    """Inverse of :func:`optimizer_tensors` (other entries of ``tensors`` are ignored)."""
    state: dict[int, dict[str, Tensor]] = {}
    for name, v in tensors.items():
        if name.startswith("optim."):
            _, i, k = name.split(".", 2)
            state.setdefault(int(i), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
