"""How the kernels' tensor-core dots see their operands (shared by the TTT-Linear and TTT-MLP kernels).

Every dot accumulates in fp32 and the fast weights stay fp32 in registers; what varies is the precision
the operands are rounded to on their way into the tensor cores (the ``PREC`` constexpr):

- ``"ieee"``: exact fp32 dots, for fp32 inputs;
- ``"tf32"``: operands rounded to tf32 (10-bit mantissa);
- ``"bf16"`` / ``"fp16"``: operands cast to the input dtype, as flash-linear-attention and FlashAttention
  do: half the tensor-core instructions of tf32 and half the shared memory for layout changes.

``TTT_TRITON_DOTS`` (read at every launch) picks the mode for bf16 / fp16 inputs:

- ``auto`` (default): bf16 inputs -> bf16 dots; fp16 inputs -> tf32, because casting the backward's
  gradient tiles (which grow with sequence length and loss scale) to fp16 could overflow;
- ``input``: dots in the input dtype for both;
- ``tf32``: tf32 dots for both.

fp32 inputs always get ``ieee``. Speed and accuracy of the modes: docs/kernels.md.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

MODES = ("auto", "input", "tf32")


def dot_precision(dtype: torch.dtype, mode: str | None = None) -> str:
    """The ``PREC`` constexpr of the kernels for inputs of ``dtype`` (``mode``: default
    ``$TTT_TRITON_DOTS`` or ``"auto"``)."""
    if dtype in (torch.float32, torch.float64):
        return "ieee"
    mode = mode or os.environ.get("TTT_TRITON_DOTS") or "auto"
    if mode not in MODES:
        raise ValueError(f"TTT_TRITON_DOTS must be one of {MODES}, got {mode!r}")
    if mode == "tf32" or (mode == "auto" and dtype == torch.float16):
        return "tf32"
    return "bf16" if dtype == torch.bfloat16 else "fp16"


@triton.jit
def _dot(a, b, PREC: tl.constexpr):
    """a @ b with fp32 accumulation, operands rounded as ``PREC`` says (see the module text)."""
    if PREC == "bf16":
        c = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    elif PREC == "fp16":
        c = tl.dot(a.to(tl.float16), b.to(tl.float16))
    else:
        c = tl.dot(a, b, input_precision=PREC)
    return c
