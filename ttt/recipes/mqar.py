"""Multi-query associative recall (MQAR, Zoology) on a CPU: which mixers can hold D bindings at once.

    python -m ttt.recipes.mqar --mixer ttt_linear
    python -m ttt.recipes.mqar --mixers attention,ttt_linear,gated_deltanet --threads 2 --out runs/mqar

Trains a small ``ttt.models.CausalLM`` per mixer on MQAR examples (``ttt.data.make_mqar``) with
cross-entropy on the labelled positions only, then reports test accuracy (per example, the fraction of
query keys whose value is the argmax; averaged over examples), overall and per (T, D) slice. Training
and test slices are the same (T, D) pairs, drawn with different seeds.

Deviations from Zoology's configs (DATA.md 6.1), all to fit minutes per mixer on 2 CPU cores:

- data: V = 256 (Zoology 8192); (T, D) = (64, 4) and (64, 8) (config A goes up to (512, 64)); 5,000
  training and 250 test examples per slice (config A: 100,000 / 3,000); blanks stay 0 as in config A
  (``--random-non-queries`` for config B); each batch holds one slice, batches in shuffled order
  (Zoology: unshuffled, T = 64 first);
- model: this library's LM: RMSNorm, a SwiGLU MLP of width 2d after every mixer (Zoology's MQAR
  configs have none), RoPE in the mixers that use it instead of learned positions, no dropout, tied
  head; d = 64, 2 layers, 2 heads for every mixer (Zoology's attention has 1); every mixer with this
  library's defaults: short convs on q, k, v in the delta rules; TTT with RoPE and no conv
  (``share_qk=False``), mini-batch 16, base lr 1.0 (TTT-Linear) / 0.1 (TTT-MLP); no conv and no positions
  in ``linear_attention`` (Zoology's config B gives every mixer a short convolution);
- training: 8 epochs (Zoology 64) of batch 32 (Zoology 512), one lr (1e-3) instead of the max over 4,
  cosine per step instead of per epoch, gradient clipping at 1.0. As in Zoology: AdamW with weight decay
  0.1, a test pass after every epoch, early stop above 0.99 test accuracy.

At this scale the run is a small-budget probe (2,512 steps of 2,048 tokens), not a reproduction:
see benchmarks/results/mqar_cpu.md for what it measured.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from .common import check_number, format_table, parse_mixer_kwargs, with_threads
from .loop import Every, MetricsLog, TrainLoop, cosine_lr

__all__ = ["MQARArgs", "MQARResult", "check_args", "main", "run_mqar", "train_mqar"]

# Zoology stops a run once the test accuracy passes this
EARLY_STOP_ACCURACY = 0.99


@dataclass
class MQARArgs:
    """Arguments of :func:`run_mqar` (the attribute docstrings are the ``--help`` text)."""

    mixers: str = "attention,ttt_linear"
    """comma-separated mixers (names in ttt.layers.MIXERS), one model each"""
    dim: int = 64
    """model width d"""
    layers: int = 2
    """blocks"""
    heads: int = 2
    """heads of every mixer"""
    vocab: int = 256
    """vocabulary V (> every T); keys are [1, V/2), values [V/2, V)"""
    seq_len: str = "64"
    """comma-separated T of each (T, D) slice"""
    num_kv: str = "4,8"
    """comma-separated D (key-value pairs) of each slice, paired with --seq-len"""
    train_examples: int = 5000
    """training examples per slice"""
    test_examples: int = 250
    """held-out test examples per slice"""
    mixer_kwargs: str | None = None
    """JSON of extra constructor arguments per mixer, e.g. '{"ttt_linear": {"share_qk": true}}'"""
    random_non_queries: bool = False
    """fill the blanks between queries with random tokens (Zoology config B) instead of 0 (config A)"""
    epochs: int = 8
    """passes over the training examples (fewer if the test accuracy passes 0.99)"""
    lr: float = 1e-3
    """AdamW peak learning rate (cosine to 0 over all steps)"""
    batch_size: int = 32
    """examples per step (every batch comes from one slice)"""
    seed: int = 0
    """seed of the data and of the initialisation"""
    threads: int | None = None
    """torch CPU threads (default: 1 on a CPU, the fast choice when cores are shared; docs/cli.md)"""
    out: str | None = None
    """directory for mqar.md and mqar.json"""
    progress: bool = True
    """show a progress bar when stderr is a terminal"""
    log_every: int = 100
    """without a progress bar (a log file), print a line every this many steps (0: never)"""


@dataclass
class MQARResult:
    mixer: str
    accuracy: float
    """mean over all test examples of the fraction of correctly recalled values"""
    slice_accuracy: dict[str, float]
    """accuracy per slice, keyed 'T=64,D=4'"""
    train_loss: float
    """cross-entropy of the last training batch"""
    epochs: int
    """epochs run (early stop included)"""
    seconds: float
    num_params: int
    history: list[float] = field(default_factory=list)
    """overall test accuracy after each epoch"""


Split = dict[tuple[int, int], tuple[Tensor, Tensor]]


def _ints(flag: str, text: str) -> list[int]:
    try:
        values = [int(s) for s in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise ValueError(f"{flag}: expected comma-separated integers >= 1 such as 64,256, got {text!r}")
    return values


def slices(args: MQARArgs) -> list[tuple[int, int]]:
    """The (T, D) pairs of ``--seq-len`` and ``--num-kv`` (a single value pairs with every other)."""
    lengths, pairs = _ints("--seq-len", args.seq_len), _ints("--num-kv", args.num_kv)
    if len(lengths) == 1:
        lengths = lengths * len(pairs)
    if len(pairs) == 1:
        pairs = pairs * len(lengths)
    if len(lengths) != len(pairs):
        raise ValueError(f"--seq-len has {len(lengths)} values, --num-kv {len(pairs)}; give equal counts")
    return list(zip(lengths, pairs))


def mixer_names(args: MQARArgs) -> list[str]:
    """The mixers of ``--mixers``, each checked against ``ttt.layers.MIXERS``."""
    from ttt.layers import check_mixer_name

    names = [m.strip() for m in args.mixers.split(",") if m.strip()]
    if not names:
        raise ValueError(
            f"--mixers: expected one or more mixer names such as ttt_linear, got {args.mixers!r}"
        )
    for name in names:
        check_mixer_name(name)
    return names


def check_args(args: MQARArgs) -> None:
    """Refuse bad arguments, each with a one-line ``ValueError`` naming its option, before any data, model
    or output exists (the data's own rules through ``make_mqar`` on zero examples)."""
    from ttt.data import make_mqar

    for flag, value in (("--dim", args.dim), ("--layers", args.layers), ("--heads", args.heads),
                        ("--train-examples", args.train_examples), ("--test-examples", args.test_examples),
                        ("--epochs", args.epochs), ("--batch-size", args.batch_size)):  # fmt: skip
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    check_number("--lr", args.lr, above=0)
    if args.log_every < 0:
        raise ValueError(f"--log-every must be >= 0 (0: never), got {args.log_every}")
    mixer_names(args)
    parse_mixer_kwargs(args.mixer_kwargs)
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    for t, d in slices(args):
        make_mqar(0, seq_len=t, num_kv_pairs=d, vocab_size=args.vocab)


def make_splits(args: MQARArgs) -> tuple[Split, Split]:
    """``(train, test)``: ``{(T, D): (inputs [N, T], labels [N, T])}`` each, from disjoint seed streams."""
    from ttt.data import make_mqar

    # Zoology draws training seeds from [0, 2^31) and test seeds from [2^31, 2^32)
    train_stream, test_stream = (torch.Generator().manual_seed(args.seed + offset) for offset in (0, 2**31))
    options = dict(vocab_size=args.vocab, random_non_queries=args.random_non_queries)
    train = {(t, d): make_mqar(args.train_examples, seq_len=t, num_kv_pairs=d, seed=train_stream, **options)
             for t, d in slices(args)}  # fmt: skip
    test = {(t, d): make_mqar(args.test_examples, seq_len=t, num_kv_pairs=d, seed=test_stream, **options)
            for t, d in slices(args)}  # fmt: skip
    return train, test


def build_model(mixer: str, args: MQARArgs, max_seq_len: int) -> torch.nn.Module:
    from ttt.models import CausalLM, LMConfig

    mixer_kwargs = parse_mixer_kwargs(args.mixer_kwargs)
    config = LMConfig.from_name("micro", vocab_size=args.vocab, dim=args.dim, n_layers=args.layers,
                                n_heads=args.heads, mixer=mixer, mlp_hidden=2 * args.dim,
                                max_seq_len=max_seq_len, mixer_kwargs=mixer_kwargs)  # fmt: skip
    return CausalLM(config)


def recall_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy over the labelled positions only: ``logits [B, T, V]``, ``labels [B, T]``."""
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)


def example_accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    """``[B]``: per example, the fraction of labelled positions whose argmax is the label."""
    labelled = labels != -100
    correct = (logits.argmax(-1) == labels) & labelled
    return correct.sum(1) / labelled.sum(1).clamp_min(1)


@torch.no_grad()
def evaluate(model: torch.nn.Module, test: Split, batch_size: int = 256) -> dict[tuple[int, int], Tensor]:
    """``{(T, D): [N]}`` per-example accuracies."""
    model.eval()
    scores = {}
    for key, (x, y) in test.items():
        scores[key] = torch.cat([example_accuracy(model(x[i : i + batch_size])[0], y[i : i + batch_size])
                                 for i in range(0, len(x), batch_size)])  # fmt: skip
    model.train()
    return scores


def epoch_batches(train: Split, batch_size: int, g: torch.Generator) -> list[tuple[Tensor, Tensor]]:
    """One epoch: every slice cut into shuffled batches, the batches of all slices in shuffled order."""
    batches = []
    for x, y in train.values():
        order = torch.randperm(len(x), generator=g)
        batches += [(x[b], y[b]) for b in order.split(batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=g)]


def train_mqar(mixer: str, args: MQARArgs, train: Split, test: Split) -> MQARResult:
    """Train one model on ``train`` and score it on ``test`` after every epoch (the recipes' one loop)."""
    torch.manual_seed(args.seed)
    model = build_model(mixer, args, max_seq_len=max(t for t, _ in train))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    steps_per_epoch = sum(-(-len(x) // args.batch_size) for x, _ in train.values())
    total = args.epochs * steps_per_epoch
    g = torch.Generator().manual_seed(args.seed)
    epoch: list[tuple[Tensor, Tensor]] = []
    history: list[float] = []
    scores: dict[tuple[int, int], Tensor] = {}

    def batch(step: int) -> tuple[Tensor, Tensor]:
        if step % steps_per_epoch == 0:
            epoch[:] = epoch_batches(train, args.batch_size, g)
        return epoch[step % steps_per_epoch]

    def test_pass(step: int) -> bool:
        scores.update(evaluate(model, test))
        history.append(float(torch.cat(list(scores.values())).mean()))
        log.scalars("test", step, {"accuracy": history[-1]})
        return history[-1] > EARLY_STOP_ACCURACY  # Zoology's early stop

    log = MetricsLog(None, total=total, log_every=args.log_every, progress=args.progress, desc=mixer)
    loop = TrainLoop(model, opt, batch, lambda xy: recall_loss(model(xy[0])[0], xy[1]), steps=total,
                     lr=lambda s: cosine_lr(s, peak=args.lr, total=total), grad_clip=1.0, log=log,
                     hooks=[Every(steps_per_epoch, test_pass)])  # fmt: skip
    try:
        loop.run()
    finally:
        log.close()
    per_slice = {f"T={t},D={d}": float(s.mean()) for (t, d), s in scores.items()}
    n_params = sum(p.numel() for p in model.parameters())
    return MQARResult(mixer, history[-1], per_slice, loop.history[-1][1], len(history), loop.seconds,
                      n_params, history)  # fmt: skip


@with_threads
def run_mqar(args: MQARArgs) -> list[MQARResult]:
    """Train and score every mixer of ``args.mixers`` on the same data."""
    check_args(args)
    train, test = make_splits(args)
    return [train_mqar(m, args, train, test) for m in mixer_names(args)]


def format_results(results: list[MQARResult]) -> str:
    """A markdown table: one row per mixer, overall and per-slice accuracy, parameters, seconds."""

    slice_names = list(results[0].slice_accuracy) if results else []
    header = ["mixer", "accuracy", *slice_names, "parameters", "epochs", "seconds"]
    rows = [[f"`{r.mixer}`", f"{r.accuracy:.3f}", *(f"{r.slice_accuracy[s]:.3f}" for s in slice_names),
             f"{r.num_params:,}", r.epochs, f"{r.seconds:.0f}"] for r in results]  # fmt: skip
    return format_table(header, rows)


def main(argv: list[str] | None = None) -> list[MQARResult]:
    from .args import parse_dataclass

    prog = "python -m ttt.recipes.mqar"
    args = parse_dataclass(MQARArgs, argv, __doc__, prog=prog, aliases={"mixers": ["--mixer"]})
    try:
        check_args(args)
    except ValueError as e:
        raise SystemExit(f"{prog}: error: {e}") from None
    results = run_mqar(args)
    table = format_results(results)
    print(table)
    if args.out is not None:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "mqar.md").write_text(table + "\n")
        payload = {"args": asdict(args), "results": [asdict(r) for r in results]}
        (out / "mqar.json").write_text(json.dumps(payload, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
