"""Evaluate a checkpoint: validation loss, bits per byte, and loss as a function of token position.

The loss-vs-position curve is the TTT paper's long-context plot (Fig. 2 right): a mixer that keeps
using its context has a loss that keeps falling with the position of the token in the window.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .args import EvalArgs
from .common import format_table, reserved_stem, resolve_device, save_plot, trained_corpus, with_threads

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
    tail: bool = False,
) -> tuple[float, Tensor]:
    """Mean loss (nats per token) over windows of ``tokens [N]`` and the mean loss at each position ``[T]``.

    Windows are the consecutive non-overlapping ``context``-token windows of
    :func:`ttt.data.validation_batches`; with ``tail`` (and ``max_batches=None``) the tokens after the last
    whole window are scored too, as one shorter window, so every token after the first is scored."""
    from ttt.data import validation_batches

    was_training = model.training
    model.eval()
    total = torch.zeros(context, dtype=torch.float64)
    count = torch.zeros(context, dtype=torch.float64)
    windows = list(validation_batches(tokens, batch_size, context, max_batches))
    rest = (tokens.numel() - 1) % context
    if tail and max_batches is None and rest:
        windows.append((tokens[-rest - 1 : -1][None], tokens[-rest:][None]))
    for x, y in windows:
        logits, _ = model(x.to(device))
        loss = F.cross_entropy(logits.transpose(1, 2), y.to(device), reduction="none")  # [B, t]
        total[: x.shape[1]] += loss.double().sum(dim=0).cpu()
        count[: x.shape[1]] += x.shape[0]
    model.train(was_training)
    return float(total.sum() / count.sum()), total / count


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
    step: int | None = None
    """its training step (None: a HF model directory, which records none)"""
    corpus: str = ""
    """the corpus whose validation split was scored (empty when a file was)"""
    file: str = ""
    """the file or directory scored whole (--file), else empty"""
    files: int = 0
    """text files scored (--file)"""
    skipped: list[str] = field(default_factory=list)
    """files of a --file directory skipped as not UTF-8 text"""
    batch_size: int = 0
    """windows per batch"""
    batches: int = 0
    """batches evaluated"""
    max_batches: int | None = None
    """the batch limit asked for (None: the whole validation split, and always for --file)"""
    out: str = ""
    """the JSON file the result was written to"""
    plot: str = ""
    """the loss-by-position plot written (empty: not written, matplotlib is missing)"""

    @property
    def what(self) -> str:
        """``step N``, or ``HF model directory`` for one (it records no step)."""
        return "HF model directory" if self.step is None else f"step {self.step}"


@dataclass
class _Scored:
    """The tokens one evaluation scores and what they are."""

    tokens: Tensor
    """``[N]`` token ids"""
    n_bytes: int
    """UTF-8 bytes of their text (for bits per byte)"""
    label: str
    """what was scored, for the report"""
    context: int
    """window length"""
    whole: bool
    """every token is scored (--file): no batch limit, the tail after the last whole window too"""
    files: int = 0
    skipped: list[str] = field(default_factory=list)


def _check(args: EvalArgs) -> None:
    for flag, value in (("--bins", args.bins), ("--batch-size", args.batch_size)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if args.max_batches is not None and args.max_batches < 1:
        raise ValueError(
            f"--max-batches must be >= 1, or none for the whole validation split, got {args.max_batches}"
        )
    if args.context is not None and args.context < 1:
        raise ValueError(f"--context must be >= 1, got {args.context}")
    if args.file is not None and args.corpus is not None:
        raise ValueError("give --file (score a file whole) or --corpus (score a validation split), not both")


def _file_tokens(path: str, tokenizer, context: int) -> _Scored:
    """Every text file under ``path`` (or ``path`` itself), joined by blank lines as a corpus's documents
    are, in the model's tokens; a text shorter than one window is scored as one shorter window."""
    from ttt.data import read_text_files

    texts, skipped = read_text_files(path)
    text = "\n\n".join(t for _, t in texts)
    tokens = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    if tokens.numel() < 2:
        raise ValueError(f"{path}: {tokens.numel()} token(s), need at least 2 to score a prediction")
    label = f"{path} (whole, {len(texts)} file{'s' * (len(texts) != 1)}, {len(text.encode()):,} bytes)"
    return _Scored(tokens, len(text.encode()), label, min(context, tokens.numel() - 1), True, len(texts),
                   [str(f) for f in skipped])  # fmt: skip


def _split_tokens(corpus_name: str, tokenizer, context: int) -> _Scored:
    """The validation split of a corpus in the model's tokens."""
    from ttt.data import load_corpus, prepare

    data = prepare(load_corpus(corpus_name), tokenizer)
    n_val = data.validation.numel()
    if n_val <= context:
        raise ValueError(
            f"the validation split of corpus {corpus_name!r} has {n_val:,} tokens, need more "
            f"than --context {context}; only the validation split is scored: the last 10% of a text file's "
            "lines, every 10th file of a directory (--file scores a whole file)"
        )
    return _Scored(
        data.validation, data.validation_bytes, f"validation split of {corpus_name}", context, False
    )


def _file_slug(path: str) -> str:
    """A file name part for ``path``: its name with anything but letters, digits, '.', '_', '-' replaced."""
    name = Path(path).resolve().name or "root"
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


@with_threads
def evaluate_checkpoint(args: EvalArgs) -> EvalResult:
    """Load a checkpoint, score a validation split (or a whole file), write the loss-vs-position table and
    plot.

    Writes ``eval-step-N.json`` (the result, with the checkpoint, step, what was scored, context and
    batches), ``loss_by_position-step-N.md`` and ``.png`` into ``args.out`` (default: the run directory;
    ``hf`` in place of ``step-N`` for a HF model directory, which records no step);
    with ``args.file`` the names go on with ``-file-NAME``, with another corpus than the checkpoint's with
    ``-corpus-NAME``, and with another context than its training context with ``-context-N``; where
    those files exist already (the same evaluation again, other --max-batches, another file of the same
    name) the name ends in ``-2``, ``-3``, ...: nothing is replaced."""
    from ttt.data import TokenData, corpus_ref
    from ttt.models.checkpoint import check_out_dir, checkpoint_tokenizer, find_checkpoint, load_model

    _check(args)
    if args.out is not None:
        check_out_dir(args.out, expected="a directory", for_run=False)
    device = resolve_device(args.device)
    ckpt = find_checkpoint(args.checkpoint)
    out = _out_dir(args, ckpt)
    model, meta = load_model(ckpt, device=device)
    train_args = meta.get("args", {})
    context = args.context if args.context is not None else train_args.get("context", 128)
    context_asked = context
    if context > model.config.max_seq_len:
        raise ValueError(
            f"context {context} is longer than this model's max_seq_len = {model.config.max_seq_len}"
        )
    tokenizer = checkpoint_tokenizer(meta)
    corpus_name = "" if args.file else corpus_ref(args.corpus) if args.corpus else trained_corpus(meta)
    scored = (
        _file_tokens(args.file, tokenizer, context)
        if args.file
        else _split_tokens(corpus_name, tokenizer, context)
    )
    max_batches = None if scored.whole else args.max_batches
    context = scored.context
    loss, by_pos = evaluate_loss(model, scored.tokens, batch_size=args.batch_size, context=context,
                                 max_batches=max_batches, device=device, tail=scored.whole)  # fmt: skip
    windows = (scored.tokens.numel() - 1) // context
    if max_batches is not None:
        windows = min(windows, max_batches * args.batch_size)
    batches = math.ceil(windows / args.batch_size)
    if scored.whole and (scored.tokens.numel() - 1) % context:
        windows, batches = windows + 1, batches + 1
    data = TokenData(scored.tokens[:0], scored.tokens, tokenizer, scored.n_bytes)
    # bins of equal width in position (the plot uses every position)
    edges = torch.linspace(0, context, min(args.bins, context) + 1).round().long().tolist()
    bins = [(a, b - 1, float(by_pos[a:b].mean())) for a, b in zip(edges, edges[1:]) if b > a]

    step = int(meta["step"]) if "step" in meta else None
    out.mkdir(parents=True, exist_ok=True)
    with reserved_stem(out, _stem(args, step, corpus_name, context_asked, train_args), _outputs) as stem:
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
            file=args.file or "",
            files=scored.files,
            skipped=scored.skipped,
            batch_size=args.batch_size,
            batches=batches,
            max_batches=max_batches,
            out=str(out / f"eval-{stem}.json"),
        )
        _write(result, out, stem, scored.label, data, by_pos, meta["config"]["mixer"])
    return result


def _stem(args: EvalArgs, step: int | None, corpus: str, context: int, train_args: dict) -> str:
    """The results' name: the step (``hf`` for a HF model directory), then what differs from the
    checkpoint's own evaluation (a file, another corpus, another context); :func:`reserved_stem` adds
    ``-2``, ``-3``, ... where those results exist already, so no evaluation replaces another."""
    stem = "hf" if step is None else f"step-{step:06d}"
    if args.file:
        stem += f"-file-{_file_slug(args.file)}"
    elif corpus != train_args.get("corpus", "shakespeare"):
        stem += f"-corpus-{_file_slug(corpus)}"
    if context != train_args.get("context", 128):
        stem += f"-context-{context}"
    return stem


def _outputs(stem: str) -> list[str]:
    """The files one evaluation writes."""
    return [f"eval-{stem}.json", f"loss_by_position-{stem}.md", f"loss_by_position-{stem}.png"]


def _out_dir(args: EvalArgs, ckpt: Path) -> Path:
    """Where the results go: ``--out``, else the run directory of a checkpoint inside one, else the
    checkpoint's own directory, which must then not be a symbolic link (the results would land at its
    target, in a directory the command was not given). Results are named by the checkpoint's step:
    evaluating another checkpoint overwrites nothing."""
    if args.out:
        return Path(args.out)
    if (ckpt.parent / "latest").exists():
        return ckpt.parent
    if ckpt.is_symlink():
        raise ValueError(
            f"--checkpoint {ckpt} is a symbolic link (to {os.readlink(ckpt)}): eval writes its results "
            "beside the checkpoint, never through a link; give --out DIR for them, or name the checkpoint "
            "itself"
        )
    return ckpt


def _write(result: EvalResult, out: Path, stem: str, label: str, data, by_pos: Tensor, mixer: str) -> None:
    """``eval-STEM.json``, ``loss_by_position-STEM.md`` and ``.png`` in ``out`` (sets ``result.plot``)."""
    from ttt.models.checkpoint import write_text_atomic

    rows = [[f"{a}-{b}", f"{v:.4f}", f"{data.bits_per_byte(v):.4f}"] for a, b, v in result.positions]
    table = format_table(["positions", "loss (nats/token)", "bits/byte"], rows)
    write_text_atomic(
        out / f"loss_by_position-{stem}.md",
        f"# Loss by token position\n\ncheckpoint: {result.checkpoint} ({result.what})\n\nscored: "
        f"{label}\n\nloss {result.loss:.4f} nats/token, {result.bits_per_byte:.4f} bits/byte, "
        f"{result.windows} windows of up to {result.context} tokens\n\n{table}\n",
    )
    png = out / f"loss_by_position-{stem}.png"
    plotted = save_plot(
        png,
        {mixer: (list(range(1, result.context + 1)), by_pos.tolist())},
        xlabel="token position",
        ylabel="loss (nats/token)",
        title=f"Loss by position ({result.what})",
        logx=True,
    )
    result.plot = str(png) if plotted else ""
    write_text_atomic(out / f"eval-{stem}.json", json.dumps(asdict(result), indent=1))
