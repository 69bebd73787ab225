"""Train a causal LM on a corpus: one readable loop (nanoGPT's shape), functions instead of globals.

AdamW (0.9, 0.95), weight decay 0.1 on matrices, linear warm-up then cosine decay, gradient clipping at
1.0: the TTT paper's recipe (Table 3, from the Mamba paper). Run with ``torchrun --nproc_per_node N``
for data parallelism (gloo on CPU, NCCL on CUDA); every process draws the same global batch and keeps
its rows, so N processes follow the single-process run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .args import TrainArgs
from .common import lm_loss, parse_mixer_kwargs, resolve_device, save_plot, set_threads, setup_dist

__all__ = ["RUN_OUTPUTS", "TrainResult", "build_optimizer", "lr_at", "train"]

#: files a run directory holds besides its checkpoints (train and eval outputs): what --overwrite removes
RUN_OUTPUTS = (
    "loss_curve.png",
    "loss_curve.png.tmp.png",
    "result.json",
    "eval.json",
    "loss_by_position.md",
    "loss_by_position.png",
    "eval-step-*.json",
    "loss_by_position-step-*.md",
    "loss_by_position-step-*.png",
)

# arguments that may change between a run and its --resume without changing the results
RUNTIME_ARGS = {
    "resume",
    "overwrite",
    "progress",
    "plot",
    "threads",
    "device",
    "out",
    "eval_every",
    "ckpt_every",
    "eval_batches",
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


def lr_at(step: int, args: TrainArgs) -> float:
    """Learning rate of ``step``: linear warm-up to ``lr``, then cosine down to ``min_lr``."""
    warmup = int(args.warmup * args.steps) if args.warmup < 1 else int(args.warmup)
    if step < warmup:
        return args.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, args.steps - warmup)
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def build_optimizer(model: nn.Module, args: TrainArgs) -> torch.optim.AdamW:
    """AdamW with weight decay on parameters of >= 2 dims (matrices, fast-weight inits) only."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8)


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors = {f"optim.{i}.{k}": v for i, st in sd["state"].items() for k, v in st.items()}
    return tensors, {"param_groups": sd["param_groups"]}


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Tensor]] = {}
    for name, v in tensors.items():
        if name.startswith("optim."):
            _, i, k = name.split(".", 2)
            state.setdefault(int(i), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _check_resume_args(saved: dict[str, Any], args: TrainArgs) -> None:
    now = dataclasses.asdict(args)
    diff = [
        f"--{k.replace('_', '-')} {saved.get(k)!r} -> {now[k]!r}"
        for k in now
        if k not in RUNTIME_ARGS and saved.get(k) != now[k]
    ]
    if diff:
        from ttt.models.checkpoint import CheckpointError

        raise CheckpointError(
            "cannot resume: the checkpoint was trained with other arguments: " + "; ".join(diff)
        )


def _check_args(args: TrainArgs) -> None:
    """Everything about the arguments that can be checked without loading data."""
    for flag, value, least in (
        ("--steps", args.steps, 1),
        ("--batch-size", args.batch_size, 1),
        ("--context", args.context, 1),
        ("--eval-batches", args.eval_batches, 1),
        ("--eval-every", args.eval_every, 0),
        ("--ckpt-every", args.ckpt_every, 0),
    ):
        if value < least:
            hint = " (0: only at the end)" if least == 0 else ""
            raise ValueError(f"{flag} must be >= {least}{hint}, got {value}")
    if args.dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be 'float32' or 'bfloat16' (autocast), got {args.dtype!r}")
    if args.resume and args.overwrite:
        raise ValueError("give --resume (continue the run in --out) or --overwrite (start over), not both")
    if args.strategy not in ("ddp", "fsdp"):
        raise ValueError(f"strategy must be 'ddp' or 'fsdp', got {args.strategy!r}")
    if args.activation_checkpointing and args.strategy != "fsdp":
        raise ValueError("--activation-checkpointing needs --strategy fsdp")
    if args.context_parallel < 1 or args.context % args.context_parallel:
        raise ValueError(
            f"--context {args.context} must split into --context-parallel {args.context_parallel} parts"
        )
    if args.context_parallel > 1 and args.strategy == "fsdp":
        raise ValueError(
            "--context-parallel runs with --strategy ddp (FSDP with context parallelism is not built)"
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


def _due(step: int, every: int, last: int) -> bool:
    """Whether something done every ``every`` steps (0: only at the end) is due after ``step``."""
    return step == last or (every > 0 and step % every == 0)


class _StopOnInterrupt:
    """From creation to :meth:`restore`, the first Ctrl-C (SIGINT) only sets ``requested``: the loop
    finishes its step, saves a checkpoint and stops. A second Ctrl-C raises KeyboardInterrupt at once.
    Only in the main thread (signals are delivered there)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(
            "\ninterrupt: stopping after this step and saving a checkpoint (Ctrl-C again: stop now, no save)",
            file=sys.stderr,
            flush=True,
        )

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


def _stop_everywhere(requested: bool, dist: Any, device: torch.device) -> bool:
    """Whether any process was asked to stop (every process must stop after the same step)."""
    if dist.world == 1:
        return requested
    flag = torch.tensor([float(requested)], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


def train(args: TrainArgs) -> TrainResult:
    """Train (or resume) a model as ``args`` says; returns the final validation figures."""
    import ttt.distributed as dist_mod
    from ttt.data import load_corpus, prepare, sample_batch, tokenizer_from_dict, train_tokenizer
    from ttt.models import CausalLM, LMConfig, build_mixer
    from ttt.models.checkpoint import (
        CheckpointError,
        clear_run,
        config_diff,
        find_checkpoint,
        load_checkpoint,
        save_checkpoint,
        update_checkpoint_meta,
    )

    from .eval import evaluate_loss

    _check_args(args)
    set_threads(args.threads)
    device = resolve_device(args.device)
    dist = setup_dist(device)
    if dist.world > 1 and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    cp_group, cp_rank, dp_rank, dp_world = None, 0, dist.rank, dist.world  # data-parallel place
    if args.context_parallel > 1:  # blocks of ranks that share one sequence, split along T
        cp_group, cp_rank, dp_rank, dp_world = dist_mod.context_parallel_groups(args.context_parallel)
    if args.batch_size % dp_world:
        raise ValueError(
            f"batch_size {args.batch_size} must be divisible by the {dp_world} data-parallel groups"
        )
    run_dir = Path(args.out or f"runs/{args.mixer}-{args.preset}")

    # a previous run in run_dir is either resumed or, only when asked, replaced
    saved = None
    if args.resume:
        saved = load_checkpoint(run_dir, load_trainer=True)
        _check_resume_args(saved[1].get("args", {}), args)
    elif not args.overwrite:
        try:
            find_checkpoint(run_dir)
        except CheckpointError:
            pass
        else:
            raise FileExistsError(
                f"{run_dir} already holds a checkpoint; pass --resume to continue it or "
                "--overwrite to start over (or choose another --out)"
            )

    corpus = load_corpus(args.corpus)
    tokenizer = (
        tokenizer_from_dict(saved[1]["tokenizer"])
        if saved
        else train_tokenizer(args.tokenizer, corpus.train_text(), args.vocab_size)
    )
    data = prepare(corpus, tokenizer)
    layer_mixers = tuple(args.layer_mixers.split(",")) if args.layer_mixers else None
    config = LMConfig.from_name(
        args.preset,
        mixer=args.mixer,
        vocab_size=tokenizer.vocab_size,
        layer_mixers=layer_mixers,
        mixer_kwargs=parse_mixer_kwargs(args.mixer_kwargs),
    )
    for name in sorted(
        set(config.mixers)
    ):  # a bad --mixer-kwargs argument fails here, before anything is written
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
    _check_splits(data, corpus, args.context)
    if saved and LMConfig.from_dict(saved[1]["config"]) != config:
        raise CheckpointError(
            "checkpoint was made with another model config: "
            + config_diff(LMConfig.from_dict(saved[1]["config"]), config)
        )
    # every argument is checked: only now may --overwrite delete the previous run
    if args.overwrite and dist.main:
        removed = clear_run(run_dir, RUN_OUTPUTS)
        shutil.rmtree(run_dir / "dcp", ignore_errors=True)  # --strategy fsdp's sharded checkpoints
        if removed:
            print(f"--overwrite: removed {', '.join(p.name for p in removed)} from {run_dir}", flush=True)

    torch.manual_seed(args.seed)
    model = CausalLM(config).to(device)
    fsdp = args.strategy == "fsdp"
    if fsdp:  # torch.distributed.fsdp / .checkpoint take seconds to import: only when asked for
        from ttt.distributed import fsdp as fsdp_mod
    if saved:
        model.load_state_dict(saved[0], strict=False)
    if fsdp:  # weights, gradients and optimizer state sharded; resumed weights are loaded before
        fsdp_mod.shard_model(
            model, mixed_precision=args.dtype == "bfloat16", checkpoint_blocks=args.activation_checkpointing
        )
    optimizer = build_optimizer(model, args)
    sampler = torch.Generator().manual_seed(args.seed)
    step, history, elapsed = 0, {"train": [], "val": []}, 0.0
    if saved:
        model_state, meta, trainer = saved
        if fsdp:
            fsdp_mod.load_sharded(run_dir / "dcp" / f"step-{meta['step']:07d}", model, optimizer)
        else:
            _load_optimizer(optimizer, trainer, meta["optimizer"])
        sampler.set_state(trainer["rng.sampler"])
        torch.set_rng_state(trainer["rng.torch"])
        step, history, elapsed = meta["step"], meta["history"], meta.get("seconds", 0.0)
    ddp_model: nn.Module = model
    if dist.world > 1 and not fsdp:
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if cp_group is not None:
        dist_mod.enable_context_parallel(model, cp_group)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")

    def validate() -> tuple[float, float]:
        paused = dist_mod.disable_context_parallel(model)  # every process scores whole windows
        with autocast:
            loss, _ = evaluate_loss(
                model,
                data.validation,
                batch_size=max(1, args.batch_size // dist.world),
                context=args.context,
                max_batches=args.eval_batches,
                device=device,
            )
        dist_mod.restore_context_parallel(paused)
        return loss, data.bits_per_byte(loss)

    def checkpoint() -> Path | None:
        if fsdp:  # every process writes its shards, then rank 0 exports the whole model as usual
            fsdp_mod.save_sharded(run_dir / "dcp", step, model, optimizer)
            full = fsdp_mod.full_model_state(model)
        if not dist.main:
            return None
        tensors, opt_meta = (
            ({}, {"sharded": f"dcp/step-{step:07d}"}) if fsdp else _optimizer_tensors(optimizer)
        )
        tensors["rng.sampler"] = sampler.get_state()
        tensors["rng.torch"] = torch.get_rng_state()
        meta = {
            "args": dataclasses.asdict(args),
            "tokenizer": tokenizer.to_dict(),
            "optimizer": opt_meta,
            "history": history,
            "seconds": elapsed,
            "num_params": model.num_params(),
        }
        return save_checkpoint(
            run_dir,
            step=step,
            model_state=full if fsdp else model.state_dict(),
            config=config,
            meta=meta,
            trainer_tensors=tensors,
        )

    bar = None
    # from here on, Ctrl-C finishes the step in progress, saves it and stops
    stop = _StopOnInterrupt()
    try:
        if dist.main:
            print(
                f"model: {args.preset} / {','.join(sorted(set(config.mixers)))}, "
                f"{model.num_params():,} parameters; data: {corpus!r}, {data.train.numel():,} train tokens; "
                f"device {device}, {dist.world} process(es)",
                flush=True,
            )
        if dist.main and args.progress:
            from tqdm.auto import tqdm

            # disable=None: no bar when stderr is not a terminal (a log file gets the eval lines only)
            bar = tqdm(
                total=args.steps, initial=step, unit="step", dynamic_ncols=True, mininterval=1.0, disable=None
            )
            if bar.disable:
                bar = None
        tokens_per_step = args.batch_size * args.context
        saved_step = step
        model.train()
        t_last = time.perf_counter()
        while step < args.steps:
            lr = lr_at(step, args)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, y = sample_batch(data.train, args.batch_size, args.context, sampler, shard=(dp_rank, dp_world))
            if cp_group is not None:  # this process's segment of every sequence
                seg = slice(
                    cp_rank * x.shape[1] // args.context_parallel,
                    (cp_rank + 1) * x.shape[1] // args.context_parallel,
                )
                x, y = x[:, seg], y[:, seg]
            with autocast:
                logits, _ = ddp_model(x.to(device))
                loss = lm_loss(logits, y.to(device))
            loss.backward()
            if args.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            now = time.perf_counter()
            dt, t_last = now - t_last, now
            elapsed += dt
            loss_value = loss.detach()
            if dist.world > 1:
                # log the global batch's loss, not this process's share of it
                torch.distributed.all_reduce(loss_value, op=torch.distributed.ReduceOp.AVG)
            loss_value = loss_value.item()
            history["train"].append([step, loss_value])
            if bar is not None:
                bar.set_postfix(
                    loss=f"{loss_value:.3f}", tok_s=f"{tokens_per_step / dt:,.0f}", lr=f"{lr:.1e}"
                )
                bar.update(1)
            # checkpoint before validating: a validation that fails or is interrupted loses nothing
            saved = None
            if _due(step, args.ckpt_every, args.steps):
                saved = checkpoint()
                saved_step = step
            if _due(step, args.eval_every, args.steps):
                val_loss, bpb = validate()
                history["val"].append([step, val_loss, bpb])
                if saved is not None:
                    update_checkpoint_meta(saved, history=history)
                if dist.main:
                    msg = (
                        f"step {step}/{args.steps}: train loss {loss_value:.4f}, val loss {val_loss:.4f}, "
                        f"val bits/byte {bpb:.4f}, {tokens_per_step * step / max(elapsed, 1e-9):,.0f} tok/s"
                    )
                    (bar.write if bar is not None else print)(msg)
            t_last = time.perf_counter()
            if _stop_everywhere(stop.requested, dist, device):
                if saved_step != step:
                    checkpoint()
                if dist.main:
                    print(
                        f"interrupted: step {step} is saved in {run_dir}; continue it with --resume",
                        file=sys.stderr,
                        flush=True,
                    )
                raise KeyboardInterrupt
    finally:
        stop.restore()
        if bar is not None:
            bar.close()
    if not history["val"] or history["val"][-1][0] != step:
        val_loss, bpb = validate()
        history["val"].append([step, val_loss, bpb])
    val_loss, bpb = history["val"][-1][1], history["val"][-1][2]
    if dist.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        result_path = run_dir / "result.json"
        if args.plot:
            xs, ys = zip(*history["train"]) if history["train"] else ((), ())
            curves = {"train": (list(xs), list(ys))}
            if history["val"]:
                curves["validation"] = ([v[0] for v in history["val"]], [v[1] for v in history["val"]])
            save_plot(
                run_dir / "loss_curve.png",
                curves,
                xlabel="step",
                ylabel="loss (nats/token)",
                title=f"{args.mixer} / {args.preset} on {args.corpus}",
            )
        print(
            f"final: step {step}, val loss {val_loss:.4f} nats/token, val bits/byte {bpb:.4f} "
            f"({elapsed:.0f} s of training)",
            flush=True,
        )
    result = TrainResult(
        str(run_dir),
        step,
        val_loss,
        bpb,
        model.num_params(),
        elapsed,
        tokens_per_step * len(history["train"]) / max(elapsed, 1e-9),
        history,
    )
    if dist.owns_group:
        # DDP's reducer and the context-parallel groups go first: a process group whose last owner is
        # the reducer can deadlock in its destructor (its worker thread waits for the GIL)
        dist_mod.disable_context_parallel(model)
        cp_group = ddp_model = None  # noqa: F841
        torch.distributed.destroy_process_group()
    if dist.main:
        result_path.write_text(
            json.dumps({k: v for k, v in dataclasses.asdict(result).items() if k != "history"}, indent=1)
        )
    return result
