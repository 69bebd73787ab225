"""Evaluate a checkpoint: validation loss, bits per byte, and loss as a function of token position.

The loss-vs-position curve is the TTT paper's long-context plot (Fig. 2 right): a mixer that keeps
using its context has a loss that keeps falling with the position of the token in the window.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .args import EvalArgs
from .common import format_table, resolve_device, save_plot, set_threads

__all__ = ["EvalResult", "evaluate_checkpoint", "evaluate_loss"]


@torch.no_grad()
def evaluate_loss(
    model: nn.Module,
    tokens: Tensor,
    *,
    batch_size: int,
    context: int,
    max_batches: int | None,
    device: torch.device,
) -> tuple[float, Tensor]:
    """Mean loss (nats per token) over validation windows and the mean loss at each position ``[T]``."""
    from ttt.data import validation_batches

    was_training = model.training
    model.eval()
    total = torch.zeros(context, dtype=torch.float64)
    count = 0
    for x, y in validation_batches(tokens, batch_size, context, max_batches):
        logits, _ = model(x.to(device))
        loss = F.cross_entropy(logits.transpose(1, 2), y.to(device), reduction="none")  # [B, T]
        total += loss.double().sum(dim=0).cpu()
        count += x.shape[0]
    model.train(was_training)
    by_position = total / count
    return float(by_position.mean()), by_position


@dataclass
class EvalResult:
    """Validation figures of one checkpoint."""

    loss: float
    """mean validation loss, nats per token"""
    bits_per_byte: float
    """loss converted to bits per UTF-8 byte"""
    perplexity: float
    """exp(loss), per token"""
    context: int
    """window length"""
    windows: int
    """windows evaluated"""
    positions: list[tuple[int, int, float]]
    """(first position, last position, mean loss) per position bin"""
    checkpoint: str = ""
    """the checkpoint directory evaluated"""
    step: int = 0
    """its training step"""
    corpus: str = ""
    """the corpus whose validation split was scored"""
    batch_size: int = 0
    """windows per batch"""
    batches: int = 0
    """batches evaluated"""
    max_batches: int | None = None
    """the batch limit asked for (None: the whole validation split)"""
    out: str = ""
    """the JSON file the result was written to"""


def evaluate_checkpoint(args: EvalArgs) -> EvalResult:
    """Load a checkpoint, evaluate on the validation split, write the loss-vs-position table and plot.

    Writes ``eval-step-N.json`` (the result, with the checkpoint, step, corpus, context and batches),
    ``loss_by_position-step-N.md`` and ``.png`` into ``args.out`` (default: the run directory)."""
    from ttt.data import load_corpus, prepare
    from ttt.models.checkpoint import checkpoint_tokenizer, find_checkpoint, load_model, write_text_atomic

    if args.bins < 1 or args.batch_size < 1:
        raise ValueError("--bins and --batch-size must be >= 1")
    if args.max_batches is not None and args.max_batches < 1:
        raise ValueError(
            f"--max-batches must be >= 1, or none for the whole validation split, got {args.max_batches}"
        )
    if args.context is not None and args.context < 1:
        raise ValueError(f"--context must be >= 1, got {args.context}")
    set_threads(args.threads)
    device = resolve_device(args.device)
    ckpt = find_checkpoint(args.checkpoint)
    model, meta = load_model(ckpt, device=device)
    train_args = meta.get("args", {})
    context = args.context if args.context is not None else train_args.get("context", 128)
    if context > model.config.max_seq_len:
        raise ValueError(
            f"context {context} is longer than this model's max_seq_len = {model.config.max_seq_len}"
        )
    corpus_name = args.corpus or train_args.get("corpus", "shakespeare")
    corpus = load_corpus(corpus_name)
    data = prepare(corpus, checkpoint_tokenizer(meta))
    n_val = data.validation.numel()
    if n_val <= context:
        raise ValueError(
            f"the validation split of corpus {corpus_name!r} has {n_val:,} tokens, need more "
            f"than --context {context}; only the validation split is scored: the last 10% of a text file's "
            "lines, every 10th file of a directory"
        )
    loss, by_pos = evaluate_loss(
        model,
        data.validation,
        batch_size=args.batch_size,
        context=context,
        max_batches=args.max_batches,
        device=device,
    )
    windows = (n_val - 1) // context
    if args.max_batches is not None:
        windows = min(windows, args.max_batches * args.batch_size)
    # bins of equal width in position (the plot uses every position)
    edges = torch.linspace(0, context, min(args.bins, context) + 1).round().long().tolist()
    bins = [(a, b - 1, float(by_pos[a:b].mean())) for a, b in zip(edges, edges[1:]) if b > a]

    # results are named by the checkpoint's step: evaluating another checkpoint overwrites nothing
    out = Path(args.out) if args.out else ckpt.parent if (ckpt.parent / "latest").exists() else ckpt
    out.mkdir(parents=True, exist_ok=True)
    step = int(meta.get("step", 0))
    stem = f"step-{step:06d}"
    result = EvalResult(
        loss,
        data.bits_per_byte(loss),
        math.exp(loss),
        context,
        windows,
        bins,
        checkpoint=str(ckpt),
        step=step,
        corpus=corpus_name,
        batch_size=args.batch_size,
        batches=math.ceil(windows / args.batch_size),
        max_batches=args.max_batches,
        out=str(out / f"eval-{stem}.json"),
    )
    rows = [[f"{a}-{b}", f"{v:.4f}", f"{data.bits_per_byte(v):.4f}"] for a, b, v in bins]
    table = format_table(["positions", "loss (nats/token)", "bits/byte"], rows)
    write_text_atomic(
        out / f"loss_by_position-{stem}.md",
        f"# Loss by token position\n\ncheckpoint: {ckpt} (step {step})\n\ncorpus: {corpus_name} (validation "
        f"split)\n\nvalidation loss {loss:.4f} nats/token, {result.bits_per_byte:.4f} bits/byte, {windows} "
        f"windows of {context} tokens\n\n{table}\n",
    )
    write_text_atomic(out / f"eval-{stem}.json", json.dumps(asdict(result), indent=1))
    save_plot(
        out / f"loss_by_position-{stem}.png",
        {meta["config"]["mixer"]: (list(range(1, context + 1)), by_pos.tolist())},
        xlabel="token position",
        ylabel="loss (nats/token)",
        title=f"Validation loss by position (step {step})",
        logx=True,
    )
    return result
