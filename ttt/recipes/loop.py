"""The one training loop of the recipes (LM, MQAR, digits): schedule, step, checks, hooks, logging.

A recipe gives :class:`TrainLoop` its model, optimizer, a batch source, a loss and the things to do
every N steps (validate, checkpoint, early stop); the loop owns the rest:

    for each step: set the lr (warm-up + cosine), draw a batch, loss, stop on a non-finite loss,
    backward, clip (the norm is computed even without clipping: it tells a diverged step), optimizer
    step (or, with ``skip_spikes``, none when the norm is a spike), log, run the due hooks, stop when
    asked (Ctrl-C / SIGTERM / a hook)

Logging (:class:`MetricsLog`): a progress bar when stderr is a terminal, else a line every ``log_every``
steps; every record in ``metrics.jsonl`` and, when the ``tensorboard`` package is installed, in
TensorBoard event files of the run directory.
"""

from __future__ import annotations

import json
import math
import signal
import statistics
import sys
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ttt._interrupt import Interrupted, in_main_thread

__all__ = [
    "Every",
    "StopOnInterrupt",
    "MetricsLog",
    "StepOutcome",
    "TrainLoop",
    "TrainingDiverged",
    "check_finite_weights",
    "cosine_lr",
    "is_metrics_log",
    "warmup_steps",
]


#: how many of the latest gradient norms ``TrainLoop.skip_spikes`` takes the median of, and how many it
#: needs before it skips any step
SPIKE_WINDOW, SPIKE_MIN_WINDOW = 20, 10

#: what a divergence message of ``ttt train`` suggests; other recipes name their own flags
TRAIN_REMEDY = "lower --lr, lengthen --warmup, or check the data"


class TrainingDiverged(RuntimeError):
    """The loss, the gradient or the weights became NaN or infinite; nothing of that step was saved."""


def warmup_steps(warmup: float, total: int) -> int:
    """The warm-up's length in steps: ``warmup`` steps (>= 1), or that fraction of ``total`` (< 1)."""
    return int(warmup * total) if warmup < 1 else int(warmup)


def cosine_lr(step: int, *, peak: float, total: int, warmup: float = 0.0, final: float = 0.0) -> float:
    """Learning rate of ``step`` (0-based): linear warm-up to ``peak`` over ``warmup`` steps (a fraction
    of ``total`` when < 1; :func:`warmup_steps`), then cosine down to ``final`` at step ``total``: the
    schedule's value once the run is over, so the last step (``total - 1``) runs a little above ``final``
    (``final + (peak - final) * (1 - cos(pi / (total - warmup))) / 2``). Without warm-up this equals
    ``torch.optim.lr_scheduler.CosineAnnealingLR(T_max=total, eta_min=final)`` after ``step`` steps."""
    n_warmup = warmup_steps(warmup, total)
    if step < n_warmup:
        return peak * (step + 1) / n_warmup
    progress = (step - n_warmup) / max(1, total - n_warmup)
    return final + 0.5 * (peak - final) * (1 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class Every:
    """Run ``fn(step)`` after every ``every`` steps and after the last one (``every`` 0: only the last);
    ``fn`` returning True stops the loop (an early stop)."""

    every: int
    fn: Callable[[int], bool | None]

    def due(self, step: int, last: int) -> bool:
        return step == last or (self.every > 0 and step % self.every == 0)


@dataclass
class StepOutcome:
    """What one optimizer step measured."""

    loss: float
    grad_norm: float
    lr: float
    seconds: float
    skipped: bool = False
    """the gradient norm was a spike (``TrainLoop.skip_spikes``): no optimizer step was taken"""


class MetricsLog:
    """Where the loop's numbers go: a bar or log lines on the console, JSONL and TensorBoard files.

    ``out``: directory of ``metrics.jsonl`` (and the event files); None writes no files.
    ``log_every``: print a line every this many steps when there is no progress bar (0: never).
    ``start``: the step a resumed run starts from; records of later steps (left by an interrupted run)
    are dropped from the JSONL.
    ``desc``: names the bar and starts each log line; ``kind``: the JSONL ``kind`` (TensorBoard tag) of
    the step records (``ttt convert`` logs its two stages as ``transfer`` and ``distill``).
    """

    JSONL = "metrics.jsonl"

    def __init__(self, out: Path | None, *, total: int, start: int = 0, log_every: int = 50,
                 progress: bool = True, desc: str | None = None, kind: str = "train",
                 enabled: bool = True) -> None:  # fmt: skip
        self.out, self.total, self.log_every, self.enabled = out, total, log_every, enabled
        self.desc, self.kind = desc, kind
        self.bar, self.tb, self._jsonl = None, None, None
        self.tensorboard_note = ""
        self._start = start
        self._window = (0, 0.0)  # steps and seconds since the last console line
        self._opened = out is None  # the files are opened at the first record: a failed start leaves none
        if not enabled:
            return
        if progress:
            from tqdm.auto import tqdm

            # disable=None: no bar when stderr is not a terminal (log lines instead)
            bar = tqdm(total=total, initial=start, unit="step", desc=desc, dynamic_ncols=True,
                       mininterval=1.0, disable=None)  # fmt: skip
            self.bar = None if bar.disable else bar

    @property
    def files(self) -> list[str]:
        """The names of the files this log wrote into ``out`` (for the 'wrote ...' line)."""
        if self._jsonl is None:
            return []
        return [self.JSONL] + (["TensorBoard events.out.tfevents.*"] if self.tb is not None else [])

    def step(self, step: int, outcome: StepOutcome, tokens: int = 0) -> None:
        """One optimizer step's record (every step goes to the files; the console every ``log_every``)."""
        if not self.enabled:
            return
        record = {"step": step, "loss": outcome.loss, "grad_norm": outcome.grad_norm, "lr": outcome.lr}
        self._write(self.kind, step, record | ({"skipped": 1} if outcome.skipped else {}))
        # the rate over the steps since the last console line (one step's time is noisy)
        n, seconds = self._window[0] + 1, self._window[1] + outcome.seconds
        rate = f"{tokens * n / max(seconds, 1e-9):,.0f} tok/s" if tokens else ""
        self._window = (0, 0.0)
        if self.bar is not None:
            postfix = {"loss": f"{outcome.loss:.3f}", "lr": f"{outcome.lr:.1e}"}
            self.bar.set_postfix(postfix | ({"rate": rate} if rate else {}))
            self.bar.update(1)
        elif self.log_every > 0 and step % self.log_every == 0:
            self.print(f"{self.desc + ' ' if self.desc else ''}step {step}/{self.total}: {self.kind} loss "
                       f"{outcome.loss:.4f}, lr {outcome.lr:.2e}"
                       + (f", {rate}" if rate else ""))  # fmt: skip
        else:
            self._window = (n, seconds)

    def scalars(self, kind: str, step: int, values: dict[str, float]) -> None:
        """Other measurements (validation, accuracy) of ``step``, to the files."""
        if self.enabled:
            self._write(kind, step, {"step": step, **values})

    def print(self, message: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self._jsonl is not None:
            self._jsonl.close()
        if self.tb is not None:
            self.tb.close()

    def _write(self, kind: str, step: int, record: dict[str, Any]) -> None:
        if not self._opened:
            self._opened = True
            self.out.mkdir(parents=True, exist_ok=True)
            self._jsonl = _open_jsonl(self.out / self.JSONL, keep_until=self._start)
            self.tb, self.tensorboard_note = _tensorboard_writer(self.out)
        if self._jsonl is not None:
            self._jsonl.write(json.dumps({"kind": kind, **record}, allow_nan=False) + "\n")
            self._jsonl.flush()
        if self.tb is not None:
            for name, value in record.items():
                if name != "step":
                    self.tb.add_scalar(f"{kind}/{name}", value, step)


def _open_jsonl(path: Path, keep_until: int) -> Any:
    """Append to ``path``, first dropping the records of steps after ``keep_until`` (an interrupted run's)
    and any line cut short (a run killed while writing it): the records kept go into a temporary that is
    renamed over ``path``, so a run killed meanwhile leaves the old file or the new one, never a part."""
    from ttt.models.checkpoint import write_text_atomic

    if path.exists():
        text = path.read_text()
        lines = text.splitlines()
        kept = [line for line in lines if _step_of(line) <= keep_until]
        if len(kept) < len(lines) or (text and not text.endswith("\n")):
            write_text_atomic(path, "".join(line + "\n" for line in kept))
    return open(path, "a")


def is_metrics_log(path: Path, kinds: Collection[str] | None = None) -> bool:
    """Whether the file ``path`` holds nothing but ttt's step records (JSON objects with a ``kind`` and a
    ``step``; with ``kinds``, of those kinds), the last line possibly cut short by a killed run (it still
    begins ``{"kind"``, as every record :class:`MetricsLog` writes): the records of a run that stopped
    before its first checkpoint, which a new run into the directory may replace."""
    with open(path, "rb") as f:
        lines = f.read(64 << 20).decode(errors="replace").splitlines()
    for i, line in enumerate(lines):
        last = i == len(lines) - 1
        if last and not line.startswith('{"kind"'):
            return False
        try:
            record = json.loads(line)
        except ValueError:
            if last:
                continue  # cut short
            return False
        if not (isinstance(record, dict) and "kind" in record and "step" in record):
            return False
        if kinds is not None and record["kind"] not in kinds:
            return False
    return True


def _step_of(line: str) -> float:
    """The step of a JSONL record; infinity (dropped) for a line that is not a complete record."""
    try:
        record = json.loads(line)
        return float(record["step"]) if isinstance(record, dict) else math.inf
    except (ValueError, KeyError, TypeError):
        return math.inf


def _tensorboard_writer(out: Path) -> tuple[Any, str]:
    """A TensorBoard SummaryWriter into ``out`` when the ``tensorboard`` package is installed."""
    try:
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None, "no TensorBoard files: pip install 'ttt[tensorboard]' to get them"
    return SummaryWriter(log_dir=str(out)), ""


@dataclass
class TrainLoop:
    """One optimizer loop. ``batch(step)`` gives the inputs of step ``step`` (0-based), ``loss(batch)``
    runs the model and returns a scalar; ``hooks`` run after the steps they are due (in order: put a
    checkpoint before a validation); ``stop()`` True after a step ends the loop there (Ctrl-C, SIGTERM).

    ``reduce``: the loss as logged and checked, e.g. its mean over ``torch.distributed`` processes. The
    gradient norm is clipped and checked over the model's parameters that have a gradient.

    ``skip_spikes`` > 0: a step whose gradient norm (before clipping) exceeds that multiple of the median
    of the last :data:`SPIKE_WINDOW` steps' norms (skipped ones included, so a lasting rise is soon
    accepted) applies nothing: its batch and its place in the schedule are used up, AdamW's moments stay
    as they were. Clipping bounds a spike's norm but not its direction: the clipped gradient of a spike
    lies mostly on the few weights that made it, and AdamW turns that into steps of about the lr on each
    of them. ``norms`` holds the window; a recipe saves it with its checkpoints for an exact resume.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    batch: Callable[[int], Any]
    loss: Callable[[Any], Tensor]
    steps: int
    lr: Callable[[int], float]
    grad_clip: float = 1.0
    hooks: list[Every] = field(default_factory=list)
    log: MetricsLog | None = None
    tokens_per_step: int = 0
    stop: Callable[[], bool] = lambda: False
    reduce: Callable[[Tensor], Tensor] = lambda t: t
    on_diverged: Callable[[int], str] = lambda step: ""
    remedy: str = TRAIN_REMEDY
    """what the divergence message suggests (the recipe's own flags)"""
    history: list[list[float]] = field(default_factory=list)
    """``[step, loss]`` of every step run"""
    seconds: float = 0.0
    """time spent in steps (not in hooks)"""
    skip_spikes: float = 0.0
    norms: list[float] = field(default_factory=list)
    """the latest gradient norms (at most :data:`SPIKE_WINDOW`), for ``skip_spikes``"""
    skipped: list[int] = field(default_factory=list)
    """the steps (1-based, as logged) whose update was skipped as a spike"""

    def run(self, start: int = 0) -> int:
        """Steps ``start + 1 .. steps``; returns the last step run (earlier on a stop)."""
        step = start
        self.model.train()
        while step < self.steps:
            outcome = self.one_step(step)
            step += 1
            self.seconds += outcome.seconds
            self.history.append([step, outcome.loss])
            if self.log is not None:
                self.log.step(step, outcome, tokens=self.tokens_per_step)
            stop = [hook.fn(step) for hook in self.hooks if hook.due(step, self.steps)]
            if any(stop) or self.stop():
                break
        return step

    def one_step(self, step: int) -> StepOutcome:
        """Optimizer step number ``step + 1``: nothing is applied when its loss or gradient is not finite."""
        t0 = time.perf_counter()
        lr = self.lr(step)
        for group in self.optimizer.param_groups:  # a group may carry its own multiple of the schedule
            group["lr"] = lr * group.get("lr_scale", 1.0)
        loss = self.loss(self.batch(step))
        loss_value = float(self.reduce(loss.detach()))
        loss.backward()
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = float(
            torch.nn.utils.clip_grad_norm_(params, self.grad_clip if self.grad_clip > 0 else math.inf)
        )
        if not (math.isfinite(loss_value) and math.isfinite(norm)):
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingDiverged(
                f"training diverged at step {step + 1}: the loss is {loss_value}, the gradient norm {norm}; "
                f"nothing of step {step + 1} was applied or saved{self.on_diverged(step + 1)}; {self.remedy}"
            )
        spike = self.is_spike(norm)
        self.norms = (self.norms + [norm])[-SPIKE_WINDOW:]
        if spike:
            self.skipped.append(step + 1)
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepOutcome(loss_value, norm, lr, time.perf_counter() - t0, skipped=spike)

    def is_spike(self, norm: float) -> bool:
        """Whether ``norm`` is more than ``skip_spikes`` times the median of :attr:`norms` (never with
        ``skip_spikes`` 0 or fewer than :data:`SPIKE_MIN_WINDOW` norms seen)."""
        if self.skip_spikes <= 0 or len(self.norms) < SPIKE_MIN_WINDOW:
            return False
        return norm > self.skip_spikes * statistics.median(self.norms)


def check_finite_weights(model: nn.Module, step: int, note: str = "", remedy: str = TRAIN_REMEDY) -> None:
    """Raise :class:`TrainingDiverged` when a parameter holds NaN or infinity (before saving it)."""
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise TrainingDiverged(
            f"training diverged at step {step}: the weights hold NaN or infinity; nothing of step {step} "
            f"was saved{note}; {remedy}"
        )


class StopOnInterrupt:
    """From creation to :meth:`restore`, the first Ctrl-C (SIGINT) or SIGTERM (``kill``, a batch
    scheduler's end of job) only sets ``requested``: the loop finishes its step, saves a checkpoint and
    stops. A second one raises :class:`~ttt._interrupt.Interrupted` at once. Only in the main
    thread (signals are delivered there)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}
        if in_main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise Interrupted
        self.requested = True
        name = "interrupt" if signum == signal.SIGINT else signal.Signals(signum).name
        print(
            f"\n{name}: stopping after this step and saving a checkpoint (again: stop now, no save)",
            file=sys.stderr,
            flush=True,
        )

    def restore(self) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        self._previous = {}
