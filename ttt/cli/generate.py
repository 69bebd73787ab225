"""``ttt generate``: continue a prompt with a trained model, streaming; reports tokens/s."""

from __future__ import annotations

import sys

from ttt.recipes.args import GenerateArgs
from ttt.recipes.common import counted

EPILOG = """examples:
  ttt generate --checkpoint runs/ttt_linear-tiny --prompt "ROMEO:"
  ttt generate --checkpoint runs/ttt_linear-tiny --prompt-file scene.txt --max-new-tokens 500 --temperature 0
  # nucleus sampling; print only the new text, not the prompt before it
  ttt generate --checkpoint runs/ttt_linear-tiny --prompt "ROMEO:" --top-k none --top-p 0.9 --no-echo
  # decode speed after a long prefix (first 4096 validation tokens as the prompt, not printed)
  ttt generate --checkpoint runs/ttt_linear-tiny --prompt-tokens 4096 --no-stream --no-echo
  # every line of prompts.txt continued, all in one batch
  ttt generate --checkpoint runs/ttt_linear-tiny --prompts-file prompts.txt --max-new-tokens 100
"""
HELP = "generate text from a checkpoint"
ARGS = GenerateArgs
OPTIONS = {"required": ("checkpoint",)}


def run(args: GenerateArgs) -> int:
    from ttt.recipes.generate import generate_text

    if not args.checkpoint:
        raise ValueError("--checkpoint is required")
    r = generate_text(args)
    rate = "n/a" if r.decode_tokens_per_second is None else f"{r.decode_tokens_per_second:.1f}"
    for i, (prompt, text, line) in enumerate(zip(r.prompts, r.texts, r.prompt_lines)):
        where = "" if line == i + 1 else f" (line {line})"  # blank lines before it were skipped
        print(f"--- prompt {i + 1} of {len(r.prompts)}{where} ---\n{prompt if args.echo else ''}{text}")
    if r.prompts:
        print(
            f"[{counted(len(r.prompts), 'prompt')}, {counted(r.prompt_tokens, 'prompt token')}; "
            f"first new tokens after {r.prefill_seconds:.3f} s; {counted(r.new_tokens, 'new token')}, "
            f"then {rate} tokens/s over the batch]",
            file=sys.stderr,
        )
        return 0
    if not args.stream:
        print((r.prompt if args.echo else "") + r.text)
    print(
        f"[{counted(r.prompt_tokens, 'prompt token')} prefilled in {r.prefill_seconds:.3f} s; "
        f"{counted(r.new_tokens, 'new token')} "
        f"at {rate} tokens/s; decode state {r.state_bytes / 2**10:,.1f} KiB]",
        file=sys.stderr,
    )
    return 0
