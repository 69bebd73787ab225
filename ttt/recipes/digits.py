"""Train the bidirectional encoder on scikit-learn's handwritten digits (pixels as a 64-token sequence).

    python -m ttt.recipes.digits --mixer ttt_linear --epochs 10

Reports test accuracy; a linear classifier on the raw pixels gets about 0.96 on this split, so an encoder
that reads the sequence well should reach the mid 0.9s within a few CPU minutes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .common import with_threads
from .loop import TrainLoop, cosine_lr

__all__ = ["DigitsArgs", "DigitsResult", "train_digits"]


@dataclass
class DigitsArgs:
    """Arguments of :func:`train_digits`."""

    mixer: str = "ttt_linear"
    """mixer made bidirectional (a name in ttt.layers.MIXERS)"""
    epochs: int = 10
    """passes over the 1,437 training images"""
    batch_size: int = 32
    """images per step"""
    lr: float = 3e-3
    """AdamW learning rate (cosine to 0)"""
    dim: int = 64
    """width"""
    n_layers: int = 2
    """blocks"""
    limit: int | None = None
    """use only this many training images (smoke tests)"""
    seed: int = 0
    """seed"""
    threads: int | None = None
    """torch CPU threads (default: 1, the fast choice when cores are shared; docs/cli.md)"""


@dataclass
class DigitsResult:
    test_accuracy: float
    train_loss: float
    seconds: float
    num_params: int


@with_threads
def train_digits(args: DigitsArgs) -> DigitsResult:
    """Train and evaluate (the recipes' one loop); returns the test accuracy."""
    from ttt.data import load_digits
    from ttt.models.encoder import EncoderClassifier, EncoderConfig

    x_tr, y_tr, x_te, y_te = load_digits(seed=args.seed)
    if args.limit is not None:
        x_tr, y_tr = x_tr[: args.limit], y_tr[: args.limit]
    torch.manual_seed(args.seed)
    model = EncoderClassifier(EncoderConfig(mixer=args.mixer, dim=args.dim, n_layers=args.n_layers))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    steps_per_epoch = (len(x_tr) + args.batch_size - 1) // args.batch_size
    total = args.epochs * steps_per_epoch
    g = torch.Generator().manual_seed(args.seed)
    order = torch.empty(0, dtype=torch.long)

    def batch(step: int) -> Tensor:
        nonlocal order
        if step % steps_per_epoch == 0:
            order = torch.randperm(len(x_tr), generator=g)
        i = (step % steps_per_epoch) * args.batch_size
        return order[i : i + args.batch_size]

    loop = TrainLoop(model, opt, batch, lambda b: F.cross_entropy(model(x_tr[b]), y_tr[b]), steps=total,
                     lr=lambda s: cosine_lr(s, peak=args.lr, total=total), grad_clip=1.0)  # fmt: skip
    loop.run()
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(x_te[i : i + 256]).argmax(-1) for i in range(0, len(x_te), 256)])
    accuracy = float((pred == y_te).float().mean())
    n_params = sum(p.numel() for p in model.parameters())
    train_loss = loop.history[-1][1] if loop.history else 0.0
    return DigitsResult(accuracy, train_loss, loop.seconds, n_params)


def main(argv: list[str] | None = None) -> None:
    from .args import parse_dataclass

    r = train_digits(parse_dataclass(DigitsArgs, argv, __doc__, prog="python -m ttt.recipes.digits"))
    print(f"test accuracy {r.test_accuracy:.4f} ({r.num_params:,} parameters, {r.seconds:.0f} s)")


if __name__ == "__main__":
    main()
