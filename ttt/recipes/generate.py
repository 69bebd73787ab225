"""Generate text from a checkpoint: prefill the prompt in one chunked call, then decode token by token.

With ``prompts_file`` every line is a prompt and all of them run as one ragged batch
(:meth:`ttt.models.CausalLM.generate` with ``lengths``).

Reports prefill time and decode tokens/s. For TTT and the linear-attention family the decode state has
a constant size, so decode speed does not depend on the prompt length; attention's KV cache grows.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import TextIO

import torch

from .args import GenerateArgs
from .common import check_number, check_seed, resolve_device, trained_corpus, with_threads

__all__ = ["GenerateResult", "generate_text"]


@dataclass
class GenerateResult:
    """Generated text and speed. A batch (``prompts_file``) fills ``prompts`` and ``texts``, one per line;
    its ``text`` is empty, ``prompt_tokens`` / ``new_tokens`` are totals, ``prefill_seconds`` is the
    time to the first new token of every row and ``state_bytes`` is 0 (not measured)."""

    text: str
    prompt_tokens: int
    new_tokens: int
    prefill_seconds: float
    decode_tokens_per_second: float | None
    """None when nothing was timed after the first new token (``max_new_tokens == 1``)"""
    state_bytes: int
    prompts: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    prompt_lines: list[int] = field(default_factory=list)
    """for a batch: each prompt's line in ``prompts_file``, from 1 (blank lines hold no prompt)"""
    prompt: str = ""
    """the prompt of a single continuation as text (empty for a batch)"""


def _prompt_ids(args: GenerateArgs, meta: dict, tokenizer) -> tuple[str, list[int]]:
    """The prompt as text and as token ids."""
    given = [
        a for a in (args.prompt, args.prompt_file, args.prompt_tokens, args.prompts_file) if a is not None
    ]
    if len(given) > 1:
        raise ValueError("give only one of --prompt, --prompt-file, --prompt-tokens, --prompts-file")
    if args.prompt_tokens is not None:
        from ttt.data import load_corpus

        if args.prompt_tokens < 1:
            raise ValueError("--prompt-tokens must be >= 1")
        corpus = load_corpus(trained_corpus(meta))
        ids = tokenizer.encode(corpus.validation_text()[: args.prompt_tokens * 16])[: args.prompt_tokens]
        if len(ids) < args.prompt_tokens:
            raise ValueError(f"the validation split has only {len(ids)} tokens")
        return tokenizer.decode(ids), ids
    text = args.prompt
    if args.prompt_file is not None:
        from ttt.data import read_text

        text = read_text(args.prompt_file)
    if not text:
        given = args.prompt is not None or args.prompt_file is not None
        what = "the prompt is empty" if given else "no prompt given"
        raise ValueError(
            f"{what}: give --prompt TEXT, --prompt-file PATH, --prompt-tokens N or --prompts-file PATH"
        )
    return text, tokenizer.encode(text)


@with_threads
@torch.inference_mode()
def generate_text(args: GenerateArgs, out: TextIO | None = None) -> GenerateResult:
    """Load a checkpoint and continue a prompt; streams to ``out`` (default stdout) when ``args.stream``,
    the prompt first when ``args.echo``."""
    from ttt.data import StreamDecoder
    from ttt.models import sample, state_nbytes
    from ttt.models.checkpoint import checkpoint_tokenizer, load_model

    out = out or sys.stdout
    device = resolve_device(args.device)
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    check_seed(args.seed)
    # not a < 0 test: NaN must fail too
    check_number("--temperature", args.temperature, least=0, hint=" (0: greedy)")
    if args.top_k is not None and args.top_k < 1:
        raise ValueError(f"--top-k must be >= 1, or none to sample from every token, got {args.top_k}")
    # written so that NaN fails too
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must lie in (0, 1], or none to sample from every token, got {args.top_p}")
    if args.top_p is not None and args.temperature == 0:
        raise ValueError("--top-p has no effect with --temperature 0 (greedy): give one of them")
    model, meta = load_model(args.checkpoint, device=device)
    model.eval()
    tokenizer = checkpoint_tokenizer(meta)
    if args.prompts_file is not None:
        if any(a is not None for a in (args.prompt, args.prompt_file, args.prompt_tokens)):
            raise ValueError("give only one of --prompt, --prompt-file, --prompt-tokens, --prompts-file")
        return _generate_batch(args, model, tokenizer, device)
    prompt, ids = _prompt_ids(args, meta, tokenizer)
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
    if args.stream and args.echo:
        out.write(prompt)
        out.flush()
    t0 = time.perf_counter()
    for i in range(args.max_new_tokens):
        token = sample(
            logits, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, generator=generator
        )
        new.append(int(token))
        if args.stream:
            out.write(stream.push(new[-1]))
            out.flush()
        if i + 1 < args.max_new_tokens:
            logits, state = model.step(token, state)
    sync()
    decode = time.perf_counter() - t0
    if args.stream:
        out.write(stream.flush() + "\n")
        out.flush()
    # the last sampled token needs no step, so max_new_tokens - 1 steps were timed (plus sampling)
    steps = args.max_new_tokens - 1
    rate = steps / max(decode, 1e-9) if steps else None
    text, size = tokenizer.decode(new), state_nbytes(state)
    return GenerateResult(text, len(ids), len(new), prefill, rate, size, prompt=prompt)


def _read_prompts(path: str) -> list[tuple[int, str]]:
    """``(line number from 1, prompt)`` for every line of ``path`` that is not blank."""
    from ttt.data import read_text

    lines = read_text(path).splitlines()  # \n, \r\n and \r line ends alike
    prompts = [(n, p) for n, p in enumerate(lines, 1) if p.strip()]
    if not prompts:
        raise ValueError(f"{path} holds no prompt: write one prompt per line")
    return prompts


def _generate_batch(args: GenerateArgs, model, tokenizer, device: torch.device) -> GenerateResult:
    """Every line of ``args.prompts_file`` continued in one ragged batch."""
    numbered = _read_prompts(args.prompts_file)
    prompts = [p for _, p in numbered]
    ids = [tokenizer.encode(p) for p in prompts]
    empty = [n for (n, _), i in zip(numbered, ids) if not i]
    if empty:
        raise ValueError(f"{args.prompts_file}: the prompt on line {empty[0]} encodes to no tokens")
    longest = max(len(i) for i in ids)
    if longest + args.max_new_tokens > model.config.max_seq_len:
        raise ValueError(
            f"the longest prompt ({longest} tokens) + --max-new-tokens ({args.max_new_tokens}) is longer "
            f"than this model's max_seq_len = {model.config.max_seq_len}"
        )
    idx = torch.zeros(len(ids), longest, dtype=torch.long, device=device)
    for row, i in enumerate(ids):
        idx[row, : len(i)] = torch.tensor(i, device=device)
    lengths = torch.tensor([len(i) for i in ids])
    generator = torch.Generator(device=device).manual_seed(args.seed)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    stream = model.generate_stream(
        idx, args.max_new_tokens, lengths=lengths, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, generator=generator,
    )  # fmt: skip
    t0 = time.perf_counter()
    columns = [next(stream)]
    sync()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    columns += list(stream)
    sync()
    rest = time.perf_counter() - t0
    new = torch.stack(columns, dim=1).tolist()  # [B, N]
    texts = [tokenizer.decode(row) for row in new]
    rate = len(ids) * (args.max_new_tokens - 1) / max(rest, 1e-9) if args.max_new_tokens > 1 else None
    # generate_stream keeps its state to itself: no decode-state size for a batch
    return GenerateResult(
        "", int(lengths.sum()), len(ids) * args.max_new_tokens, first, rate, 0, prompts, texts,
        prompt_lines=[n for n, _ in numbered],
    )  # fmt: skip
