"""Generate text from a checkpoint: prefill the prompt in one chunked call, then decode token by token.

Reports prefill time and decode tokens/s. For TTT and the linear-attention family the decode state has
a constant size, so decode speed does not depend on the prompt length; attention's KV cache grows.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import TextIO

import torch

from .args import GenerateArgs
from .common import resolve_device, set_threads

__all__ = ["GenerateResult", "generate_text"]


@dataclass
class GenerateResult:
    """Generated text and speed."""

    text: str
    prompt_tokens: int
    new_tokens: int
    prefill_seconds: float
    decode_tokens_per_second: float
    state_bytes: int


def _prompt_ids(args: GenerateArgs, meta: dict, tokenizer) -> list[int]:
    given = [a for a in (args.prompt, args.prompt_file, args.prompt_tokens) if a is not None]
    if len(given) > 1:
        raise ValueError("give only one of --prompt, --prompt-file, --prompt-tokens")
    if args.prompt_tokens is not None:
        from ttt.data import load_corpus

        if args.prompt_tokens < 1:
            raise ValueError("--prompt-tokens must be >= 1")
        corpus = load_corpus(meta.get("args", {}).get("corpus", "shakespeare"))
        ids = tokenizer.encode(corpus.validation_text()[: args.prompt_tokens * 16])[: args.prompt_tokens]
        if len(ids) < args.prompt_tokens:
            raise ValueError(f"the validation split has only {len(ids)} tokens")
        return ids
    text = args.prompt
    if args.prompt_file is not None:
        with open(args.prompt_file, encoding="utf-8") as f:
            text = f.read()
    if not text:
        raise ValueError("the prompt is empty: give --prompt TEXT, --prompt-file PATH or --prompt-tokens N")
    return tokenizer.encode(text)


@torch.inference_mode()
def generate_text(args: GenerateArgs, out: TextIO | None = None) -> GenerateResult:
    """Load a checkpoint and continue a prompt; streams to ``out`` (default stdout) when ``args.stream``."""
    from ttt.data import StreamDecoder, tokenizer_from_dict
    from ttt.models import sample, state_nbytes
    from ttt.models.checkpoint import load_model

    out = out or sys.stdout
    set_threads(args.threads)
    device = resolve_device(args.device)
    if args.max_new_tokens < 1:
        raise ValueError("--max-new-tokens must be >= 1")
    model, meta = load_model(args.checkpoint, device=device)
    model.eval()
    tokenizer = tokenizer_from_dict(meta["tokenizer"])
    ids = _prompt_ids(args, meta, tokenizer)
    if len(ids) + args.max_new_tokens > model.config.max_seq_len:
        raise ValueError(
            f"prompt ({len(ids)} tokens) + --max-new-tokens ({args.max_new_tokens}) is longer "
            f"than this model's max_seq_len = {model.config.max_seq_len}"
        )
    generator = torch.Generator(device=device).manual_seed(args.seed)
    idx = torch.tensor([ids], device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    t0 = time.perf_counter()
    logits, state = model(idx)
    logits = logits[:, -1]
    sync()
    prefill = time.perf_counter() - t0
    stream = StreamDecoder(tokenizer)
    new: list[int] = []
    t0 = time.perf_counter()
    for i in range(args.max_new_tokens):
        token = sample(logits, temperature=args.temperature, top_k=args.top_k, generator=generator)
        new.append(int(token))
        if args.stream:
            out.write(stream.push(new[-1]))
            out.flush()
        if i + 1 < args.max_new_tokens:
            logits, state = model.step(token, state)
    sync()
    decode = time.perf_counter() - t0
    if args.stream:
        out.write("\n")
        out.flush()
    # the last sampled token needs no step, so max_new_tokens - 1 steps were timed (plus sampling)
    steps = max(1, args.max_new_tokens - 1)
    return GenerateResult(
        tokenizer.decode(new), len(ids), len(new), prefill, steps / max(decode, 1e-9), state_nbytes(state)
    )
