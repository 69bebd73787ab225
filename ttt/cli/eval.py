"""``ttt eval``: loss, bits per byte and loss vs position of a checkpoint, on a validation split or a file."""

from __future__ import annotations

import sys

from ttt.recipes.args import EvalArgs
from ttt.recipes.common import counted

EPILOG = """examples:
  ttt eval --checkpoint runs/ttt_linear-tiny
  # longer windows than in training: does the loss keep falling with the position?
  ttt eval --checkpoint runs/ttt_linear-tiny --context 1024 --batch-size 2 --max-batches 8
  # an older checkpoint on another text (its validation split: the last 10% of the file's lines)
  ttt eval --checkpoint runs/ttt_linear-tiny/step-000400 --corpus my_text.txt --out eval_out
  ttt eval --checkpoint runs/ttt_linear-tiny --max-batches none   # the whole validation split
  # every token of a text file, or of every text file in a directory, the results named after it
  ttt eval --checkpoint runs/ttt_linear-tiny --file notes.txt
  ttt eval --checkpoint runs/ttt_linear-tiny --file my_texts/ --context 512
"""
HELP = "evaluate a checkpoint (loss, bits/byte, loss vs position)"
ARGS = EvalArgs
OPTIONS = {"required": ("checkpoint",)}


def run(args: EvalArgs) -> int:
    from pathlib import Path

    from ttt._extras import install_hint
    from ttt.recipes.eval import evaluate_checkpoint

    if not args.checkpoint:
        raise ValueError("--checkpoint is required")
    r = evaluate_checkpoint(args)
    whole = f"the whole of {r.file} ({counted(r.files, 'text file')})"
    scored = whole if r.file else f"validation split of {r.corpus}"
    print(f"checkpoint {r.checkpoint} ({r.what}), {scored}")
    if r.skipped:
        shown = ", ".join(r.skipped[:5]) + (f" and {len(r.skipped) - 5} more" if len(r.skipped) > 5 else "")
        print(f"skipped {len(r.skipped)} files that are not UTF-8 text: {shown}", file=sys.stderr)
    print(
        f"{'file' if r.file else 'validation'}: loss {r.loss:.4f} nats/token, "
        f"{r.bits_per_byte:.4f} bits/byte, perplexity {r.perplexity:.2f} "
        f"({counted(r.windows, 'window')} of up to {r.context} tokens)"
    )
    print("loss by position:")
    for a, b, v in r.positions:
        print(f"  {a:>6}-{b:<6} {v:.4f}")
    md = Path(r.out).with_name(Path(r.out).stem.replace("eval-", "loss_by_position-", 1) + ".md")
    plot = f", {r.plot}" if r.plot else f"; no plot: {install_hint('matplotlib', 'the plot')}"
    print(f"written: {r.out}, {md}{plot}")
    return 0
