"""What the benchmarks share: timing, the float64 correctness gate, the compiled-PyTorch switch, output
files (the kernel benchmarks), and a conversion checkpoint with its teacher and text (the ``convert_*``
scripts). Imported by the scripts beside it (run from any directory)."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable

import torch

from ttt.ops import compile_chunk_steps
from ttt.testing import budget

GATED = ("o", "dq", "dk", "dv", "dlr")


def bench(fn, device, quick=False):
    """Median ms of ``triton.testing.do_bench`` on CUDA (``quick``: 50 ms of repeats); one call on CPU."""
    if device == "cuda":
        import triton

        warmup, rep = (10, 50) if quick else (25, 100)
        return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def gate(run: Callable[[str, torch.dtype], list], dtype: torch.dtype) -> tuple[bool, dict]:
    """Ours vs the chunked form in float64 with the STYLE R13 budget.

    ``run(impl, dtype)`` returns ``[o, dq, dk, dv, dlr]`` of one call. A quantity passes when
    ``err(ours) <= 2 * (err(chunk in dtype) + eps(dtype) * max|ref|)``, all against float64."""
    ref, low, ours = run("chunk", torch.float64), run("chunk", dtype), run("triton", dtype)
    ok, report = True, {}
    for name, r, lo, got in zip(GATED, ref, low, ours):
        if not torch.isfinite(got).all():
            ok, report[name] = False, "non-finite"
            continue
        err, bound = budget(got, r, lo, dtype)
        report[name] = f"{err:.2e}<={bound:.2e}"
        ok &= err <= bound
    return ok, report


@contextlib.contextmanager
def pytorch_mode(compiled: bool, tf32: bool):
    """Our chunked form as timed: loop bodies compiled or eager, fp32 matmuls in TF32 or full precision."""
    precision = torch.get_float32_matmul_precision()
    compile_chunk_steps(compiled)
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    try:
        yield
    finally:
        compile_chunk_steps(False)
        torch.set_float32_matmul_precision(precision)


@contextlib.contextmanager
def dots_mode(mode):
    """``TTT_TRITON_DOTS`` = mode while inside (None: leave it as it is)."""
    old = os.environ.get("TTT_TRITON_DOTS")
    if mode is not None:
        os.environ["TTT_TRITON_DOTS"] = mode
    try:
        yield
    finally:
        if mode is not None:
            os.environ.pop("TTT_TRITON_DOTS", None)
            if old is not None:
                os.environ["TTT_TRITON_DOTS"] = old


def ours_name(mode, dots):
    """Column of one dot mode: "ours" for the first of ``dots`` (``--dots``), "ours <mode> dots" for the others."""
    return "ours" if mode == dots[0] else f"ours {mode} dots"


def raise_recompile_limit(limit: int):
    """One compiled graph per shape and loop body (and grad mode): several shapes must stay compiled."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # torch < 2.6
    setattr(config, name, max(getattr(config, name), limit))


def fmt(v):
    return f"{v:.3f}" if isinstance(v, float) else ("-" if v is None else str(v))


def write_out(path, text, payload):
    """The markdown to ``path`` and the raw rows beside it (``.json``); nothing without a path."""
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    with open(os.path.splitext(path)[0] + ".json", "w") as f:
        json.dump(payload, f, indent=1)
        f.write("\n")


def finish_report(script, lines, payload, argv, out):
    """The table ``lines`` and the command that made them (``python benchmarks/SCRIPT ARGS``, ARGS from
    ``argv`` or the command line): printed, and with ``out`` (a path stem) written to OUT.md, with
    ``payload`` in OUT.json. Returns the markdown."""
    args = argv if argv is not None else sys.argv[1:]
    md = "\n".join(lines) + f"\n\nCommand: `python benchmarks/{script} " + " ".join(args) + "`\n"
    print(md)
    if out:
        write_out(os.path.splitext(str(out))[0] + ".md", md, payload)
    return md


def load_conversion(checkpoint):
    """``(student, teacher, meta, train split)`` of a ``ttt convert`` checkpoint directory: the student as
    saved, the run's teacher (frozen, eval mode) and its corpus's training tokens in the run's tokenizer;
    ``SystemExit`` (one line) for a checkpoint of anything else."""
    from ttt.data import load_corpus, prepare
    from ttt.data.tokenizer import tokenizer_from_dict
    from ttt.models.checkpoint import load_model
    from ttt.recipes.convert import load_teacher

    student, meta = load_model(checkpoint)
    if "summary" not in meta or "transfer_steps" not in meta.get("args", {}):
        raise SystemExit(f"{checkpoint} is not a checkpoint of a ttt convert run (no conversion summary): "
                         "give RUN or RUN/step-N")  # fmt: skip
    args = meta["args"]
    teacher, _ = load_teacher(args["teacher"], args.get("first_blocks"))
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    train = prepare(load_corpus(args["corpus"]), tokenizer_from_dict(meta["tokenizer"])).train
    return student, teacher, meta, train
