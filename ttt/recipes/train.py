"""Train a causal LM on a corpus: the recipes' one loop (:mod:`ttt.recipes.loop`), in small pieces.

AdamW (0.9, 0.95), weight decay 0.1 on matrices, linear warm-up then cosine decay, gradient clipping at
1.0: the TTT paper's recipe (Table 3, from the Mamba paper). Run with ``torchrun --nproc_per_node N``
for data parallelism (gloo on CPU, NCCL on CUDA); every process draws the same global batch and keeps
its rows, so N processes follow the single-process run.

The pieces, in order: :func:`resume_args` (a run's stored arguments), :func:`_prepare` (data, tokenizer,
model config: everything checked before anything is written), :func:`_build` (model, optimizer, the
state of a resumed run), :func:`_clear` (only then does --overwrite delete the previous run),
:func:`wrap_model` (the place where a parallel strategy wraps the model),
:func:`_fit` (the loop with its validation and checkpoint hooks), :func:`_finish` (result files).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ttt._interrupt import Interrupted

from .args import TrainArgs
from .common import (
    Dist,
    autocast,
    check_dtype,
    check_number,
    check_same_corpus,
    check_seed,
    check_skip_spikes,
    lm_loss,
    load_optimizer_tensors,
    optimizer_tensors,
    parse_mixer_kwargs,
    refuse_run_in_corpus,
    resolve_device,
    save_plot,
    setup_dist,
    with_threads,
)
from .loop import (
    Every,
    MetricsLog,
    StopOnInterrupt,
    TrainingDiverged,
    TrainLoop,
    check_finite_weights,
    cosine_lr,
    warmup_steps,
)

__all__ = [
    "RUN_OUTPUTS",
    "TrainResult",
    "TrainingDiverged",
    "build_optimizer",
    "lr_at",
    "resume_args",
    "train",
]

#: files a run directory holds besides its checkpoints (train and eval outputs, and the temporaries that
#: train's plot, result.json and resumed metrics.jsonl are written into before their rename, which a killed
#: run leaves behind): what --overwrite removes
RUN_OUTPUTS = (
    "loss_curve.png",
    ".loss_curve.png.*.png",
    "result.json",
    ".result.json.*",
    "metrics.jsonl",
    ".metrics.jsonl.*",
    "events.out.tfevents.*",
    "eval.json",
    "loss_by_position.md",
    "loss_by_position.png",
    "eval-step-*.json",
    "loss_by_position-step-*.md",
    "loss_by_position-step-*.png",
    "eval-hf*.json",
    "loss_by_position-hf*.md",
    "loss_by_position-hf*.png",
)

#: the largest count an integer option takes (steps, batch size, context, ...): torch overflows beyond
MAX_COUNT = 2**31 - 1
#: the most tokens one step may hold (--batch-size x --context)
MAX_TOKENS = 2**31

#: what --strategy fsdp writes besides (its sharded checkpoints), never a link: they would be written and
#: pruned wherever it leads (--overwrite deletes dcp as a whole)
SHARDED_OUTPUTS = ("dcp", "dcp/*")

# arguments of the machine, not of the run: --resume takes them as given now, never from the checkpoint
RUNTIME_ARGS = {"resume", "overwrite", "progress", "plot", "threads", "device", "out"}
# arguments a --resume may change without changing what was trained so far (--steps: extend the run)
RESUME_MAY_CHANGE = {
    "steps",
    "eval_every",
    "ckpt_every",
    "keep_checkpoints",
    "eval_batches",
    "log_every",
    "activation_checkpointing",
}


@dataclass
class TrainResult:
    """What a training run ends with."""

    run_dir: str
    step: int
    val_loss: float
    val_bits_per_byte: float
    num_params: int
    seconds: float
    tokens_per_second: float
    history: dict[str, list[list[float]]]


@dataclass
class _Run:
    """Everything one training run holds, passed between the pieces."""

    args: TrainArgs
    run_dir: Path
    dist: Dist
    device: torch.device
    corpus: Any = None
    data: Any = None
    tokenizer: Any = None
    config: Any = None
    saved: tuple | None = None
    model: nn.Module | None = None
    wrapped: nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None
    sampler: torch.Generator | None = None
    step: int = 0
    saved_step: int = -1
    saved_dir: Path | None = None
    """the checkpoint this process last wrote (the main process; None: none yet)"""
    warmup_steps: int = 0
    """the warm-up's length, fixed when the run starts (an extension by --resume --steps keeps it)"""
    corpus_sha256: str = ""
    """the fingerprint of the corpus text (:meth:`ttt.data.Corpus.sha256`), recorded in every checkpoint"""
    history: dict[str, list] = field(default_factory=lambda: {"train": [], "val": []})
    seconds: float = 0.0
    norms: list[float] = field(default_factory=list)
    """the loop's latest gradient norms (the window of --skip-spikes), saved with the checkpoints"""
    wrote: list[str] = field(default_factory=list)
    """files of the metrics log, and a note on TensorBoard when it is not installed"""
    cp_group: Any = None
    """the ranks that share one sequence under --context-parallel (None: no context parallelism)"""
    cp_rank: int = 0
    dp_rank: int = 0
    """this process's data-parallel place: which share of the batch it samples"""
    dp_world: int = 1


def lr_at(step: int, args: TrainArgs, n_warmup: int | None = None) -> float:
    """Learning rate of ``step`` (0-based): linear warm-up to ``lr`` over ``n_warmup`` steps (default:
    ``--warmup`` of ``--steps``), then cosine down to ``min_lr``, reached at step ``--steps`` (after the
    last one). A run extended by ``--resume --steps`` keeps the warm-up length it started with
    (``warmup_steps`` in its checkpoints) and stretches the cosine to the new end."""
    n = warmup_steps(args.warmup, args.steps) if n_warmup is None else n_warmup
    return cosine_lr(step, peak=args.lr, total=args.steps, warmup=n, final=args.min_lr)


def build_optimizer(model: nn.Module, args: TrainArgs) -> torch.optim.AdamW:
    """AdamW with weight decay on parameters of >= 2 dims (matrices, fast-weight inits) only."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8)


def given_fields(args: TrainArgs) -> set[str]:
    """The arguments given: ``args.given`` (``ttt train`` records the options typed, at any value), or for
    a ``TrainArgs`` made in Python (``given`` None) the fields whose value differs from the default."""
    if args.given is not None:
        return set(args.given)
    defaults = TrainArgs()
    return {f.name for f in _arg_fields() if getattr(args, f.name) != getattr(defaults, f.name)}


def _arg_fields() -> list[dataclasses.Field]:
    """The fields of TrainArgs that are arguments of the run (not ``given``, which says which were given)."""
    return [f for f in dataclasses.fields(TrainArgs) if f.name != "given"]


def resume_args(saved: dict[str, Any], given: TrainArgs) -> TrainArgs:
    """The arguments of a resumed run: the checkpoint's, except those given now (:func:`given_fields`).

    Machine arguments (``--threads``, ``--device``, ...) are always taken as given; ``--steps`` may grow
    (the cosine schedule is then stretched to the new end; the warm-up keeps its length); any other
    argument given with another value than the checkpoint's is refused, since the run would no longer
    continue the one it resumes (given with the checkpoint's value, or at its default, it is taken).
    """
    from ttt.models.checkpoint import CheckpointError

    defaults, merged, diff, typed = TrainArgs(), {}, [], given_fields(given)
    for f in _arg_fields():
        now, default = getattr(given, f.name), getattr(defaults, f.name)
        if f.name in RUNTIME_ARGS or f.name not in saved:
            merged[f.name] = now
            continue
        stored = saved[f.name]
        if default is not None and stored is not None and not isinstance(stored, type(default) | int):
            raise CheckpointError(
                f"the checkpoint's argument {f.name} = {str(stored)[:40]!r} has the wrong type"
            )
        if f.name not in typed or now == stored:
            merged[f.name] = stored
        elif f.name in RESUME_MAY_CHANGE:
            merged[f.name] = now
        else:
            diff.append(f"--{f.name.replace('_', '-')} {stored!r} -> {now!r}")
    if diff:
        raise CheckpointError(
            "cannot resume: the checkpoint was trained with other arguments: " + "; ".join(diff)
            + " (leave them out: --resume takes the checkpoint's)"
        )  # fmt: skip
    return TrainArgs(**merged)


def _check_resumable(meta: dict[str, Any], trainer: dict[str, Tensor]) -> None:
    """Refuse a checkpoint that lacks what resuming reads (a model-only or hand-made one)."""
    from ttt.models.checkpoint import CheckpointError

    missing = [k for k in ("args", "tokenizer", "optimizer", "history") if k not in meta]
    missing += [k for k in ("rng.sampler", "rng.torch") if k not in trainer]
    history = meta.get("history", {})
    if not missing and not (isinstance(history.get("train"), list) and isinstance(history.get("val"), list)):
        missing = ["history.train", "history.val"]
    if missing:
        raise CheckpointError(f"cannot resume: the checkpoint lacks {missing} (not saved by ttt train?)")


def _check_args(args: TrainArgs) -> None:
    """Everything about the arguments that can be checked without loading data."""
    unknown = sorted(set(args.given or ()) - {f.name for f in _arg_fields()})
    if unknown:
        raise ValueError(f"TrainArgs.given names no argument: {unknown}; expected names of TrainArgs fields")
    at_end = " (0: only at the end)"
    for flag, value, least, hint in (
        ("--steps", args.steps, 1, ""),
        ("--batch-size", args.batch_size, 1, ""),
        ("--context", args.context, 1, ""),
        ("--eval-batches", args.eval_batches, 1, ""),
        ("--eval-every", args.eval_every, 0, at_end),
        ("--ckpt-every", args.ckpt_every, 0, at_end),
        ("--keep-checkpoints", args.keep_checkpoints, 0, " (0: keep every one)"),
        ("--log-every", args.log_every, 0, " (0: validations only)"),
        ("--context-parallel", args.context_parallel, 1, ""),
    ):
        if value < least:
            raise ValueError(f"{flag} must be >= {least}{hint}, got {value}")
        if value > MAX_COUNT:  # torch's sizes and ids overflow further on (a C++ stack dump)
            raise ValueError(f"{flag} must be at most {MAX_COUNT:,} (2**31 - 1), got {value}")
    if args.batch_size * args.context > MAX_TOKENS:
        raise ValueError(
            f"--batch-size x --context is {args.batch_size * args.context:,} tokens per step; expected at "
            f"most {MAX_TOKENS:,} (2**31)"
        )
    max_vocab = _max_vocab()
    if args.tokenizer == "bpe" and not 257 <= args.vocab_size <= max_vocab:
        raise ValueError(
            f"--vocab-size must be in [257, {max_vocab:,}] for --tokenizer bpe (the 256 bytes and at least "
            f"one merge; at most the vocabulary a checkpoint may hold), got {args.vocab_size}"
        )
    check_dtype(args.dtype)
    check_number("--lr", args.lr, above=0)
    for flag, value in (("--warmup", args.warmup), ("--weight-decay", args.weight_decay)):
        check_number(flag, value, least=0)
    check_number("--grad-clip", args.grad_clip, least=0, hint=" (0: off)")
    check_skip_spikes("--skip-spikes", args.skip_spikes)
    check_seed(args.seed)
    if not args.resume:  # --resume fills the arguments not given from the checkpoint: checked after that
        _check_together(args)
    if args.resume and args.overwrite:
        raise ValueError("give --resume (continue the run in --out) or --overwrite (start over), not both")
    if args.strategy not in ("ddp", "fsdp"):
        raise ValueError(f"strategy must be 'ddp' or 'fsdp', got {args.strategy!r}")
    if args.context % args.context_parallel:
        raise ValueError(
            f"--context {args.context} must split into --context-parallel {args.context_parallel} parts"
        )
    if args.context_parallel > 1 and args.activation_checkpointing:
        raise ValueError(
            "--activation-checkpointing with --context-parallel is not built (recomputing a block would "
            "repeat its exchange of states between the ranks)"
        )
    if args.context_parallel > 1 and args.strategy == "fsdp":
        raise ValueError(
            "--context-parallel runs with --strategy ddp (FSDP with context parallelism is not built)"
        )


def _max_vocab() -> int:
    """The largest vocabulary a checkpoint may hold (``load_checkpoint`` refuses a larger config)."""
    from ttt.models.checkpoint import config_bound

    return config_bound("vocab_size")


def _check_together(args: TrainArgs, *, resumed: bool = False) -> None:
    """The checks that read several arguments, on the arguments of the run: a new run's as given, a resumed
    run's once ``resume_args`` has merged them with its checkpoint's."""
    if args.warmup >= 1 and int(args.warmup) > args.steps:  # the peak lr would never be reached
        raise ValueError(
            f"--warmup {args.warmup:g} steps is longer than the run (--steps {args.steps}): give at most "
            f"{args.steps} steps, or a fraction of --steps (< 1)"
        )
    if not 0 <= args.min_lr <= args.lr:
        raise ValueError(f"--min-lr must lie in [0, --lr], got {args.min_lr} (--lr {args.lr})")
    if not resumed:  # a resumed run keeps the mixer settings of its checkpoint (_model_config)
        # a bad --mixer-kwargs is refused before any data is loaded
        _refuse_context_parallel_share_qk(args, train_mixer_kwargs(args))


def _refuse_context_parallel_share_qk(args: TrainArgs, mixer_kwargs: dict[str, dict[str, Any]]) -> None:
    if args.context_parallel > 1 and any(kw.get("share_qk") for kw in mixer_kwargs.values()):
        raise ValueError(
            "--context-parallel runs the TTT layers without short convolutions only (share_qk has no "
            "context-parallel form yet): add --mixer-kwargs "
            '\'{"ttt_linear": {"share_qk": false}}\' (or "ttt_mlp")'
        )


def _check_splits(data: Any, corpus: Any, context: int) -> None:
    """Refuse, before training, a corpus whose splits are too short for one window of ``context``."""
    n_train, n_val = data.train.numel(), data.validation.numel()
    if n_train > context + 1 and n_val > context:
        return
    raise ValueError(
        f"corpus {corpus.name!r} is too small for --context {context}: its training split has {n_train:,} "
        f"tokens (need more than {context + 1}) and its validation split {n_val:,} (need more than "
        f"{context}); a text file's validation split is its last 10% of lines, a directory's every 10th "
        "file: use a smaller --context or more text"
    )


def _stop_everywhere(requested: bool, dist: Dist, device: torch.device) -> bool:
    """Whether any process was asked to stop (every process must stop after the same step)."""
    if dist.world == 1:
        return requested
    flag = torch.tensor([float(requested)], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


def _latest_note(run_dir: Path) -> str:
    from ttt.models.checkpoint import latest_note

    return f" ({latest_note(run_dir)})"


@with_threads
def train(args: TrainArgs) -> TrainResult:
    """Train (or resume) a model as ``args`` says; returns the final validation figures.

    The run directory is locked (``.lock``) while it runs: a second ``train`` on it is refused."""
    from ttt.data import corpus_ref
    from ttt.models.checkpoint import check_out_dir, find_checkpoint, lock_run

    _check_args(args)
    args = dataclasses.replace(args, corpus=corpus_ref(args.corpus))  # recorded absolute: read from anywhere
    run_dir = check_out_dir(args.out if args.out is not None else f"runs/{args.mixer}-{args.preset}")
    refuse_run_in_corpus(run_dir, args.corpus)
    if args.resume:
        find_checkpoint(run_dir)  # a missing run is refused before the lock creates its directory
    if int(os.environ.get("RANK", "0")) != 0:
        return _train(args, run_dir)
    with lock_run(run_dir):  # SIGTERM raises while it holds the lock, until the loop's handler takes over
        return _train(args, run_dir)


def _train(args: TrainArgs, run_dir: Path) -> TrainResult:
    device = resolve_device(args.device)
    if args.context_parallel > 1 and int(os.environ.get("WORLD_SIZE", "1")) % args.context_parallel:
        raise ValueError(
            f"--context-parallel {args.context_parallel} splits each sequence over that many processes: "
            f"launch with torchrun --nproc_per_node {args.context_parallel} (or a multiple of it)"
        )
    dist = setup_dist(device, need_group=args.strategy == "fsdp")
    try:
        return _train_in_group(args, run_dir, device, dist)
    finally:  # a failed run gives back the one-process group it made for --strategy fsdp (_finish does on
        # success); under torchrun the process ends with the error
        if dist.owns_group and dist.world == 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _train_in_group(args: TrainArgs, run_dir: Path, device: torch.device, dist: Dist) -> TrainResult:
    if dist.world > 1 and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    run = _Run(args, run_dir, dist, device, dp_rank=dist.rank, dp_world=dist.world)
    if args.context_parallel > 1:  # blocks of ranks that share one sequence, split along T
        import ttt.distributed as dist_mod

        run.cp_group, run.cp_rank, run.dp_rank, run.dp_world = dist_mod.context_parallel_groups(
            args.context_parallel
        )
    if args.batch_size % run.dp_world:
        raise ValueError(
            f"batch_size {args.batch_size} must be divisible by the {run.dp_world} data-parallel groups"
        )
    run = _prepare(run)
    _build(run)
    _clear(run)
    _fit(run)
    return _finish(run)


def _prepare(run: _Run) -> _Run:
    """Resume or refuse a previous run, load the data, make the tokenizer and the model config (all of it
    before --overwrite deletes anything: :func:`_clear` runs after :func:`_build`)."""
    from ttt.data import load_corpus, prepare, train_tokenizer
    from ttt.models.checkpoint import checkpoint_tokenizer, has_checkpoints, load_checkpoint, refuse_links

    args, run_dir = run.args, run.run_dir
    if args.resume:
        run.saved = load_checkpoint(run_dir, load_trainer=True)
        _check_resumable(run.saved[1], run.saved[2])
        refuse_links(run_dir, SHARDED_OUTPUTS)  # before the shards are read through a link
        run.args = args = resume_args(run.saved[1]["args"], args)
        refuse_run_in_corpus(run_dir, args.corpus)
        _check_together(args, resumed=True)
        if args.steps < run.saved[1]["step"]:
            raise ValueError(
                f"--steps {args.steps} is below the checkpoint's step {run.saved[1]['step']}; give a larger "
                "--steps to extend the run"
            )
        run.warmup_steps = _stored_warmup(run.saved[1])
    else:
        run.warmup_steps = warmup_steps(args.warmup, args.steps)
    if not args.resume and not args.overwrite and has_checkpoints(run_dir):
        raise FileExistsError(
            f"{run_dir} already holds checkpoints ('latest' or step-N); pass --resume to continue it or "
            "--overwrite to start over (or choose another --out)"
        )
    if not args.resume and not has_checkpoints(run_dir):
        _refuse_foreign_outputs(run_dir)
    run.corpus = load_corpus(args.corpus)
    run.corpus_sha256 = run.corpus.sha256()
    if run.saved:
        check_same_corpus(run.saved[1].get("corpus_sha256"), run.corpus.name, run.corpus_sha256)
        run.tokenizer = checkpoint_tokenizer(run.saved[1])
    else:
        run.tokenizer = train_tokenizer(args.tokenizer, run.corpus.train_text(), args.vocab_size)
    run.data = prepare(run.corpus, run.tokenizer)
    run.config = _model_config(args, run.tokenizer.vocab_size, run.saved)
    _check_splits(run.data, run.corpus, args.context)
    return run


def _clear(run: _Run) -> None:
    """Once the model and its optimizer are built (everything that can fail from the arguments has been
    done): --overwrite deletes the previous run's outputs; then no file the run writes may be a link."""
    from ttt.models.checkpoint import clear_run, refuse_links

    if not run.dist.main:
        return
    refuse_links(run.run_dir, SHARDED_OUTPUTS)  # before anything is deleted: not the other run's shards
    if run.args.overwrite:
        removed = clear_run(run.run_dir, RUN_OUTPUTS)
        shutil.rmtree(run.run_dir / "dcp", ignore_errors=True)  # --strategy fsdp's sharded checkpoints
        if removed:
            print(f"--overwrite: removed {', '.join(p.name for p in removed)} from {run.run_dir}", flush=True)
    refuse_links(run.run_dir, RUN_OUTPUTS + SHARDED_OUTPUTS)


def _stored_warmup(meta: dict[str, Any]) -> int:
    """The warm-up length of a resumed run: its checkpoint's ``warmup_steps``, or (a checkpoint written
    before they were recorded) the warm-up of the arguments stored with it."""
    from ttt.models.checkpoint import CheckpointError

    if "warmup_steps" not in meta:
        args = meta["args"]
        return warmup_steps(args.get("warmup", TrainArgs.warmup), args.get("steps", TrainArgs.steps))
    n = meta["warmup_steps"]
    if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n < 2**31:
        raise CheckpointError(f"the checkpoint's warmup_steps must be an integer >= 0, got {str(n)[:40]!r}")
    return n


def _refuse_foreign_outputs(run_dir: Path) -> None:
    """A directory without checkpoints is no run: a ``result.json`` or ``loss_curve.png`` there, or a
    ``metrics.jsonl`` with lines that are not ttt's records, is the user's, and a fresh run (``--overwrite``
    too, which deletes only a run's files) would replace it. The records of a run killed before its first
    checkpoint (the last line possibly cut short) are ttt's: the new run replaces them."""
    from .loop import MetricsLog, is_metrics_log

    found = [name for name in ("result.json", "loss_curve.png") if (run_dir / name).exists()]
    jsonl = run_dir / MetricsLog.JSONL
    if jsonl.is_file() and not is_metrics_log(jsonl):
        found.append(MetricsLog.JSONL)
    if found:
        raise FileExistsError(
            f"{run_dir} holds {', '.join(found)}, which no ttt run here wrote (it has no checkpoints): a new "
            "run would replace them; move them away or choose another --out"
        )


# The layers `ttt train` builds by default, with the short causal convolutions that won every CPU
# comparison here (docs/results.md §5): the TTT layers as the (M) variant, q and k through them (share_qk;
# 3 seeds on the tiny LM at 128 and 2,048 bytes, MQAR, loss beyond the training context), and attention
# and sliding-window attention with them on q, k and v (conv_size 4; 3 seeds on the tiny LM at 2,048
# bytes, MQAR). The layer classes keep the official layers (no convolutions); each is one flag away:
# --mixer-kwargs '{"ttt_linear": {"share_qk": false}}', '{"attention": {"conv_size": 0}}'.
TRAIN_MIXER_DEFAULTS: dict[str, dict[str, Any]] = {
    "ttt_linear": {"share_qk": True},
    "ttt_mlp": {"share_qk": True},
    "attention": {"conv_size": 4},
    "swa": {"conv_size": 4},
}


def train_mixer_kwargs(args: TrainArgs) -> dict[str, dict[str, Any]]:
    """``--mixer-kwargs`` over :data:`TRAIN_MIXER_DEFAULTS`, for the mixers this run builds and the
    ``--match-params`` reference (a given key wins over its default): the model is sized to the reference
    model ``ttt train --mixer REF`` would build, and the checkpoint's config records what that was."""
    given = parse_mixer_kwargs(args.mixer_kwargs)
    used = set(args.layer_mixers.split(",")) if args.layer_mixers else {args.mixer}
    reference = {args.match_params} if args.match_params and args.match_params.lower() != "none" else set()
    unused = sorted(set(given) - used - reference)
    if unused:  # a typo'd --mixer or a stale kwargs string: the settings would be kept and never act
        raise ValueError(
            f"--mixer-kwargs sets {unused}, which this run does not build (its mixers: {sorted(used)}"
            + (f"; --match-params {args.match_params}" if reference else "")
            + ")"
        )
    merged = {name: dict(kw) for name, kw in TRAIN_MIXER_DEFAULTS.items() if name in used | reference}
    for name, kw in given.items():
        merged.setdefault(name, {}).update(kw)
    return merged


def _model_config(args: TrainArgs, vocab_size: int, saved: tuple | None) -> Any:
    """The LMConfig of ``args`` (parameter-matched), checked by building each mixer once. A resumed run
    (``saved``) keeps the mixer settings it was made with: ``ttt train``'s defaults
    (:data:`TRAIN_MIXER_DEFAULTS`) apply to new runs, and ``--mixer-kwargs`` cannot change on resume."""
    from ttt.models import LMConfig, build_mixer
    from ttt.models.checkpoint import CheckpointError, config_diff

    if saved:
        mixer_kwargs = LMConfig.from_dict(saved[1]["config"]).mixer_kwargs
        _refuse_context_parallel_share_qk(args, mixer_kwargs)
    else:
        mixer_kwargs = train_mixer_kwargs(args)
    config = LMConfig.from_name(
        args.preset,
        mixer=args.mixer,
        vocab_size=vocab_size,
        layer_mixers=tuple(args.layer_mixers.split(",")) if args.layer_mixers else None,
        mixer_kwargs=mixer_kwargs,
    )
    for name in sorted(set(config.mixers)):  # a bad --mixer-kwargs argument fails here
        build_mixer(name, config)
    if args.match_params and args.match_params.lower() != "none":
        reference = dataclasses.replace(config, mixer=args.match_params, layer_mixers=None)
        build_mixer(args.match_params, reference)  # unknown name: a clear error
        config = config.match_params(reference)
    if args.context > config.max_seq_len:
        raise ValueError(
            f"context {args.context} is longer than preset {args.preset!r} allows "
            f"(max_seq_len = {config.max_seq_len})"
        )
    if saved and LMConfig.from_dict(saved[1]["config"]) != config:
        raise CheckpointError(
            "checkpoint was made with another model config: "
            + config_diff(LMConfig.from_dict(saved[1]["config"]), config)
        )
    return config


def _build(run: _Run) -> None:
    """Model, optimizer and batch sampler; a resumed run's weights, moments, RNG states and history."""
    from ttt.models import CausalLM

    args = run.args
    torch.manual_seed(args.seed)
    run.model = CausalLM(run.config).to(run.device)
    run.model.checkpoint_blocks = args.activation_checkpointing  # FSDP too: shard_model keeps the switch
    if run.saved:  # before sharding: FSDP shards the resumed weights
        run.model.load_state_dict(run.saved[0], strict=False)
    if args.strategy == "fsdp":  # weights, gradients and optimizer state sharded (FSDP2)
        _fsdp().shard_model(run.model, mixed_precision=args.dtype == "bfloat16")
    run.optimizer = build_optimizer(run.model, args)
    run.sampler = torch.Generator().manual_seed(args.seed)
    if run.saved:
        model_state, meta, trainer = run.saved
        if args.strategy == "fsdp":
            _fsdp().load_sharded(run.run_dir / "dcp" / f"step-{meta['step']:07d}", run.model, run.optimizer)
        else:
            load_optimizer_tensors(run.optimizer, trainer, meta["optimizer"])
        run.sampler.set_state(trainer["rng.sampler"])
        torch.set_rng_state(trainer["rng.torch"])
        run.step, run.history, run.seconds = meta["step"], meta["history"], meta.get("seconds", 0.0)
        run.norms = trainer["loop.grad_norms"].tolist() if "loop.grad_norms" in trainer else []
        run.saved_step, run.saved = run.step, None
    run.wrapped = wrap_model(run.model, run.dist, run.device, args.strategy)
    if run.cp_group is not None:
        import ttt.distributed as dist_mod

        dist_mod.enable_context_parallel(run.model, run.cp_group)


def _fsdp() -> Any:
    # torch.distributed.fsdp / .checkpoint take seconds to import: only under --strategy fsdp
    from ttt.distributed import fsdp

    return fsdp


def wrap_model(model: nn.Module, dist: Dist, device: torch.device, strategy: str = "ddp") -> nn.Module:
    """The module the training step calls: ``model`` itself (one process, or already sharded by FSDP),
    or its DistributedDataParallel wrapper under ``torchrun``."""
    if dist.world == 1 or strategy == "fsdp":
        return model
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )


def _validate(run: _Run) -> tuple[float, float]:
    """Validation loss (nats/token) and bits per byte on ``--eval-batches`` batches."""
    import ttt.distributed as dist_mod

    from .eval import evaluate_loss

    paused = dist_mod.disable_context_parallel(run.model)  # every process scores whole windows
    with autocast(run.device, run.args.dtype):
        loss, _ = evaluate_loss(
            run.model,
            run.data.validation,
            batch_size=max(1, run.args.batch_size // run.dist.world),
            context=run.args.context,
            max_batches=run.args.eval_batches,
            device=run.device,
        )
    dist_mod.restore_context_parallel(paused)
    return loss, run.data.bits_per_byte(loss)


def _save(run: _Run) -> Path | None:
    """Checkpoint of the current step (the main process writes it); refuses non-finite weights."""
    from ttt.models.checkpoint import save_checkpoint

    run.saved_step = run.step
    fsdp = run.args.strategy == "fsdp"
    if fsdp:  # every process writes its shards, then the main process exports the whole model as usual
        _fsdp().save_sharded(
            run.run_dir / "dcp", run.step, run.model, run.optimizer, keep=run.args.keep_checkpoints
        )
        full = _fsdp().full_model_state(run.model)
    if not run.dist.main:
        return None
    check_finite_weights(run.model, run.step, _latest_note(run.run_dir))
    tensors, opt_meta = (
        ({}, {"sharded": f"dcp/step-{run.step:07d}"}) if fsdp else optimizer_tensors(run.optimizer)
    )
    tensors["rng.sampler"] = run.sampler.get_state()
    tensors["rng.torch"] = torch.get_rng_state()
    if run.norms:
        tensors["loop.grad_norms"] = torch.tensor(run.norms, dtype=torch.float64)
    meta = {
        "args": {f.name: getattr(run.args, f.name) for f in _arg_fields()},
        "tokenizer": run.tokenizer.to_dict(),
        "optimizer": opt_meta,
        "history": run.history,
        "seconds": run.seconds,
        "num_params": run.model.num_params(),
        "warmup_steps": run.warmup_steps,
        "corpus_sha256": run.corpus_sha256,
    }
    run.saved_dir = save_checkpoint(
        run.run_dir,
        step=run.step,
        model_state=full if fsdp else run.model.state_dict(),
        config=run.config,
        meta=meta,
        trainer_tensors=tensors,
        keep=run.args.keep_checkpoints,
    )
    return run.saved_dir


def _global_mean(run: _Run) -> Any:
    """The loss as logged and checked: the global batch's, not this process's share of it."""

    def reduce(loss: Tensor) -> Tensor:
        if run.dist.world > 1:
            torch.distributed.all_reduce(loss, op=torch.distributed.ReduceOp.AVG)
        return loss

    return reduce


def _fit(run: _Run) -> None:
    """The loop: checkpoint hook, then validation hook; Ctrl-C / SIGTERM save the step and stop."""
    from ttt.data import sample_batch
    from ttt.models.checkpoint import update_checkpoint_meta

    args, dist = run.args, run.dist
    last_checkpoint: list[Path | None] = [None]

    def batch(step: int) -> tuple[Tensor, Tensor]:
        x, y = sample_batch(run.data.train, args.batch_size, args.context, run.sampler,
                            shard=(run.dp_rank, run.dp_world))  # fmt: skip
        if run.cp_group is None:
            return x, y
        n = args.context_parallel  # this process's segment of every sequence
        seg = slice(run.cp_rank * x.shape[1] // n, (run.cp_rank + 1) * x.shape[1] // n)
        return x[:, seg], y[:, seg]

    def loss(xy: tuple[Tensor, Tensor]) -> Tensor:
        with autocast(run.device, run.args.dtype):
            logits, _ = run.wrapped(xy[0].to(run.device))
            return lm_loss(logits, xy[1].to(run.device))

    def checkpoint(step: int) -> None:
        run.step, run.seconds, run.norms = step, loop.seconds, loop.norms
        last_checkpoint[0] = _save(run)

    def validate(step: int) -> None:
        val_loss, bpb = _validate(run)
        if not math.isfinite(val_loss):
            raise TrainingDiverged(
                f"training diverged at step {step}: the validation loss is {val_loss}"
                + _latest_note(run.run_dir)
            )
        run.history["val"].append([step, val_loss, bpb])
        log.scalars("val", step, {"loss": val_loss, "bits_per_byte": bpb})
        if last_checkpoint[0] is not None and run.saved_step == step:
            update_checkpoint_meta(last_checkpoint[0], history=run.history)
        rate = args.batch_size * args.context * step / max(loop.seconds, 1e-9)
        log.print(f"step {step}/{args.steps}: train loss {run.history['train'][-1][1]:.4f}, val loss "
                  f"{val_loss:.4f}, val bits/byte {bpb:.4f}, {rate:,.0f} tok/s")  # fmt: skip

    log = _open_log(run)
    loop = TrainLoop(
        run.wrapped, run.optimizer, batch, loss, steps=args.steps,
        lr=lambda s: lr_at(s, args, run.warmup_steps),
        grad_clip=args.grad_clip, log=log, tokens_per_step=args.batch_size * args.context,
        hooks=[Every(args.ckpt_every, checkpoint), Every(args.eval_every, validate)],
        reduce=_global_mean(run), on_diverged=lambda s: _latest_note(run.run_dir),
        history=run.history["train"], seconds=run.seconds, skip_spikes=args.skip_spikes, norms=run.norms,
    )  # fmt: skip
    # from here on, Ctrl-C / SIGTERM finish the step in progress, save it and stop (in place before the
    # first line is printed: a script may signal as soon as it reads it)
    stop = StopOnInterrupt()
    loop.stop = lambda: _stop_everywhere(stop.requested, dist, run.device)
    try:
        log.print(_banner(run))
        run.step = loop.run(start=run.step)
        if loop.stop():
            _interrupted(run)
    finally:
        run.seconds = loop.seconds
        stop.restore()
        log.close()
        run.wrote = log.files + ([log.tensorboard_note] if log.tensorboard_note else [])


def _open_log(run: _Run) -> MetricsLog:
    args = run.args
    return MetricsLog(run.run_dir, total=args.steps, start=run.step, log_every=args.log_every,
                      progress=args.progress, enabled=run.dist.main)  # fmt: skip


def _banner(run: _Run) -> str:
    """The first lines: model, data, device, threads (and where a resumed run continues)."""
    args, mixers = run.args, ",".join(sorted(set(run.config.mixers)))
    text = (
        f"model: {args.preset} / {mixers}, {run.model.num_params():,} parameters; data: {run.corpus!r}, "
        f"{run.data.train.numel():,} train tokens; device {run.device}, {run.dist.world} process(es), "
        f"{torch.get_num_threads()} thread(s)"
    )
    if args.resume and run.step >= args.steps:
        text += (f"\nresumed from step {run.step} of {run.run_dir}: nothing to train (the run is at --steps "
                 f"{args.steps}; give a larger --steps to extend it)")  # fmt: skip
    elif args.resume:
        text += f"\nresumed from step {run.step} of {run.run_dir}; training to step {args.steps}"
    return text


def _interrupted(run: _Run) -> None:
    if run.saved_step != run.step:
        _save(run)
    if run.dist.main:
        print(f"interrupted: step {run.step} is saved in {run.run_dir}; continue it with --resume",
              file=sys.stderr, flush=True)  # fmt: skip
    raise Interrupted


def _finish(run: _Run) -> TrainResult:
    """Final validation (unless the last step had one), loss curve, result.json, the 'wrote' line."""
    from ttt.models.checkpoint import write_text_atomic

    args, history, step = run.args, run.history, run.step
    if not history["val"] or history["val"][-1][0] != step:
        val_loss, bpb = _validate(run)
        history["val"].append([step, val_loss, bpb])
    val_loss, bpb = history["val"][-1][1], history["val"][-1][2]
    tokens = args.batch_size * args.context * len(history["train"])
    result = TrainResult(str(run.run_dir), step, val_loss, bpb, run.model.num_params(), run.seconds,
                         tokens / max(run.seconds, 1e-9), history)  # fmt: skip
    if run.dist.owns_group:
        import ttt.distributed as dist_mod

        # DDP's reducer and the context-parallel groups go first: a process group whose last owner is
        # the reducer can deadlock in its destructor (its worker thread waits for the GIL)
        dist_mod.disable_context_parallel(run.model)
        run.cp_group = run.wrapped = None
        torch.distributed.destroy_process_group()
    if not run.dist.main:
        return result
    # a resume with nothing to train wrote no checkpoint
    wrote = [f"{run.saved_dir} (latest)"] if run.saved_dir is not None and run.saved_step == step else []
    if args.plot and _plot(run):
        wrote.append("loss_curve.png")
    elif args.plot:  # matplotlib is missing: say which extra draws the curve
        from ttt._extras import install_hint

        run.wrote.append("no loss_curve.png: " + install_hint("matplotlib", "the loss curve"))
    summary = {k: v for k, v in dataclasses.asdict(result).items() if k != "history"}
    write_text_atomic(run.run_dir / "result.json", json.dumps(summary, indent=1, allow_nan=False) + "\n")
    files = [*wrote, "result.json", *(w for w in run.wrote if not w.startswith("no "))]
    notes = "".join(f" ({w})" for w in run.wrote if w.startswith("no "))
    print(f"final: step {step}, val loss {val_loss:.4f} nats/token, val bits/byte {bpb:.4f} "
          f"({run.seconds:.0f} s of training)", flush=True)  # fmt: skip
    print(f"wrote {', '.join(files)} in {run.run_dir}{notes}", flush=True)
    return result


def _plot(run: _Run) -> bool:
    history, args = run.history, run.args
    xs, ys = zip(*history["train"]) if history["train"] else ((), ())
    curves = {"train": (list(xs), list(ys))}
    if history["val"]:
        curves["validation"] = ([v[0] for v in history["val"]], [v[1] for v in history["val"]])
    return save_plot(run.run_dir / "loss_curve.png", curves, xlabel="step", ylabel="loss (nats/token)",
                     title=f"{args.mixer} / {args.preset} on {args.corpus}")  # fmt: skip
