"""The handwritten digits that scikit-learn ships (1,797 images of 8x8 pixels), as token sequences.

Each image becomes a sequence of 64 pixel intensities (0..16, so a vocabulary of 17) read row by row;
the encoder classifies the sequence into 10 classes. The split is a fixed stratified 80/20.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["load_digits"]


def load_digits(seed: int = 0, test_fraction: float = 0.2) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns ``x_train [N, 64]`` int64 pixels, ``y_train [N]``, ``x_test [M, 64]``, ``y_test [M]``."""
    from ttt._extras import require

    datasets = require("sklearn.datasets", "the digits task")
    train_test_split = require("sklearn.model_selection", "the digits task").train_test_split
    d = datasets.load_digits()
    x = torch.tensor(d.data, dtype=torch.long)
    y = torch.tensor(d.target, dtype=torch.long)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x.numpy(), y.numpy(), test_size=test_fraction, random_state=seed, stratify=y.numpy()
    )
    return torch.from_numpy(x_tr), torch.from_numpy(y_tr), torch.from_numpy(x_te), torch.from_numpy(y_te)
