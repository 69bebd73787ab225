"""What the tests of the conversion scripts share: a tiny ``ttt convert`` run to read."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

TEXT = " ".join(f"the {w} then the {w}s, he said." for w in ["cat", "hat", "bat", "tent"] * 50)


@pytest.fixture
def tiny_conversion(tmp_path) -> Callable[..., Path]:
    """``run(name, **overrides) -> tmp_path / name``: ``ttt convert`` of a 2-block random Llama on a short
    text, one step of each stage on 2 windows of 16 tokens, a checkpoint every step (any ConvertArgs field
    may be overridden)."""
    pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    from ttt.recipes.convert import ConvertArgs, convert
    from ttt.testing import tiny_llama

    tiny_llama(tmp_path / "llama", n_layers=2)
    (tmp_path / "text.txt").write_text("\n".join([TEXT] * 12))
    base = dict(teacher=str(tmp_path / "llama"), corpus=str(tmp_path / "text.txt"), context=16, batch_size=2,
                transfer_steps=1, distill_steps=1, eval_batches=1, ckpt_every=1, progress=False)  # fmt: skip

    def run(name: str, **overrides) -> Path:
        convert(ConvertArgs(**{**base, **overrides, "out": str(tmp_path / name)}))
        return tmp_path / name

    return run
