"""Collect the ``convert.json`` of ``ttt convert`` runs into a results table (markdown + JSON), and
optionally time decoding of the teacher and of converted models after a prefix of given lengths.

    python benchmarks/convert_report.py RUN_DIR [RUN_DIR ...] --out benchmarks/results/convert_smollm2_cpu
    python benchmarks/convert_report.py RUN_DIR ... --decode 1024 --new-tokens 16 --threads 1 --out ...
    python benchmarks/convert_report.py RUN_DIR ... --decode 4096,16384 --prefill-chunk 1024 --no-table --out ...
    python benchmarks/convert_report.py RUN_DIR ... --ppl-context 256,1024,2048 --ppl-tokens 8192 --out ...

Decoding is timed side by side in one process, every model at one prefix length before the next length.
Prefixes are prefilled in chunks of ``--prefill-chunk`` tokens (carrying the state), so a prefix may exceed
the models' ``max_seq_len`` (the teacher's RoPE positions are computed, not tabled).

``--ppl-context`` scores the same first ``--ppl-tokens`` held-out tokens (the first run's corpus, its
validation split, never trained on) cut into windows of each context length, for the teacher and every run:
held-out perplexity over all positions and over the second half of every window (positions >= context / 2,
which see at least that many tokens before them: where a window of W < context / 2 tokens has to rely on
what else the model keeps).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

STAGES = ["teacher", "swapped", "calibrated", "after_transfer", "after_distill"]


def run_rows(runs: list[Path]) -> list[dict]:
    """A row per run from its ``convert.json``; ``ValueError`` (one line) for one that lacks a field."""
    from ttt.recipes.convert import read_summary

    rows = []
    for run in runs:
        try:
            rows.append(_row(run, read_summary(run)))
        except KeyError as e:
            raise ValueError(f"{run / 'convert.json'}: no {e} (not what ttt convert wrote)") from None
    return rows


def _row(run: Path, s: dict) -> dict:
    """The table row of one run's summary (a missing field: ``KeyError``)."""
    a = s["args"]
    sink = f" + {a['sink']} sink tokens" if a.get("sink") else ""
    kept = "" if a["blocks"] == "all" else f", other blocks {a['keep_as']}" + (
        f" (window {a['window']}{sink})" if a["keep_as"] == "swa" else "")  # fmt: skip
    own = f" (window {a['window']}{sink})" if a["mixer"] == "swa" else ""
    beside = f" beside a {a['in_layer_window']}-token window{sink}" if a.get("in_layer_window") else ""
    if a.get("transfer_target", "output") != "output":  # two runs differing only here stay apart
        beside += f" ({a['transfer_target']} transfer)"
    return {
        "run": str(run),
        "model": f"{a['mixer']}{own}{beside} in blocks {a['blocks']}{kept}" + (
            ", from scratch" if a.get("from_scratch") else ""),
        "perplexity": s["perplexity"], "tokens": s.get("tokens", {}), "seconds": s["seconds"],
        "steps": {"transfer": a["transfer_steps"], "distill": a["distill_steps"]},
        "eval_tokens": s["eval_tokens"], "args": a,
    } | ({"skipped_steps": s["skipped_steps"]} if "skipped_steps" in s else {})  # fmt: skip


@torch.no_grad()
def time_decode(model, length: int, new_tokens: int, vocab: int, chunk: int | None = None) -> dict:
    """Prefill ``length`` random tokens (in chunks of ``chunk`` tokens carrying the state; default: one
    call), then decode ``new_tokens`` greedily one at a time. State bytes: the final state (prefix + new)."""
    from ttt.models.lm import state_nbytes

    idx = torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(0))
    chunk = chunk or length
    t = time.perf_counter()
    state = None
    for i in range(0, length, chunk):
        logits, state = model(idx[:, i : i + chunk], state)
    prefill = time.perf_counter() - t
    token = logits[:, -1].argmax(-1)
    t = time.perf_counter()
    for _ in range(new_tokens):
        logits, state = model.step(token, state)
        token = logits.argmax(-1)
    decode = time.perf_counter() - t
    return {"context": length, "prefill_s": prefill, "decode_tokens_per_s": new_tokens / decode,
            "state_bytes": state_nbytes(state)}  # fmt: skip


@torch.no_grad()
def context_perplexity(model, tokens: torch.Tensor, context: int) -> dict:
    """Held-out perplexity of ``model`` on ``tokens`` cut into windows of ``context`` tokens: over every
    position, and over the second half of each window."""
    from ttt.recipes.eval import evaluate_loss

    loss, by_position = evaluate_loss(
        model, tokens, batch_size=1, context=context, max_batches=None, device=torch.device("cpu")
    )
    return {"context": context, "windows": (tokens.numel() - 1) // context, "perplexity": math.exp(loss),
            "second_half": math.exp(float(by_position[context // 2 :].mean()))}  # fmt: skip


def main() -> None:
    from ttt.models.checkpoint import write_text_atomic
    from ttt.recipes.args import Parser, positive_int
    from ttt.recipes.evidence.common import width_list

    p = Parser(description=__doc__)
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--out", required=True)
    p.add_argument(
        "--decode", type=width_list, default=[], help="comma-separated prefix lengths to time decoding after"
    )
    p.add_argument("--new-tokens", type=positive_int, default=16)
    p.add_argument(
        "--prefill-chunk", type=positive_int, default=None, help="prefill in chunks of this many tokens"
    )
    p.add_argument("--no-table", action="store_true", help="decoding/samples only: no perplexity table")
    p.add_argument("--threads", type=positive_int, default=1)
    p.add_argument(
        "--prompt", action="append", default=[], help="greedy continuation of this prompt per model"
    )
    p.add_argument("--prompt-tokens", type=positive_int, default=30)
    p.add_argument(
        "--ppl-context",
        type=width_list,
        default=[],
        help="comma-separated window lengths to score held-out text at",
    )
    p.add_argument(
        "--ppl-tokens", type=positive_int, default=8192, help="held-out tokens --ppl-context scores"
    )
    args = p.parse()
    if args.ppl_context and max(args.ppl_context) > args.ppl_tokens:
        p.error(f"--ppl-context {max(args.ppl_context)} is longer than --ppl-tokens {args.ppl_tokens}")
    missing = [str(run) for run in args.runs if not (run / "convert.json").is_file()]
    if missing:
        p.error(f"no convert.json in {', '.join(missing)}: expected ttt convert run directories")
    out = Path(args.out)
    if not out.parent.is_dir():  # checked before minutes of evaluation, not when writing
        p.error(f"--out {out}: no directory {out.parent} to write the report into")
    torch.set_num_threads(args.threads)
    try:
        rows = run_rows(args.runs)
    except (OSError, ValueError) as e:
        p.error(str(e))
    decode, samples, contexts = [], [], []
    if args.decode or args.prompt or args.ppl_context:
        from ttt.models.checkpoint import load_model
        from ttt.recipes.convert import load_teacher

        try:  # the first run's; fetched when missing (a moved or unfetchable teacher: one line)
            teacher, tok = load_teacher(rows[0]["args"]["teacher"], rows[0]["args"].get("first_blocks"))
        except (OSError, ValueError) as e:
            p.error(f"{rows[0]['run']}: its teacher: {e}")
        # (label, run directory, model): rows of one mixer and blocks differ only in their run
        models = [("teacher (attention)", None, teacher)]
        models += [(r["model"], r["run"], load_model(Path(r["run"]) / "hf")[0].eval()) for r in rows]
        if args.ppl_context:  # the held-out text first: a split too short fails before any timing
            from ttt.data import load_corpus, prepare

            held = prepare(load_corpus(rows[0]["args"]["corpus"]), tok).validation[: args.ppl_tokens + 1]
            if held.numel() <= max(args.ppl_context):
                p.error(f"the held-out split has {held.numel():,} tokens, too few for --ppl-context "
                        f"{max(args.ppl_context)}")  # fmt: skip
        vocab = teacher.config.vocab_size
        for n in args.decode:  # all models at one length, then the next: partial results stay comparable
            for name, run, model in models:
                decode.append(
                    {
                        "model": name,
                        "run": run,
                        **time_decode(model, n, args.new_tokens, vocab, args.prefill_chunk),
                    }
                )
                print(decode[-1], flush=True)
        for n in args.ppl_context:
            for name, run, model in models:
                contexts.append({"model": name, "run": run, **context_perplexity(model, held, n)})
                print(contexts[-1], flush=True)
        for name, run, model in models:
            for prompt in args.prompt:
                ids = torch.tensor([tok.encode(prompt)])
                new = model.generate(ids, args.prompt_tokens, temperature=0)[0, ids.shape[1] :].tolist()
                samples.append({"model": name, "run": run, "prompt": prompt, "continuation": tok.decode(new)})
                print(samples[-1], flush=True)
    write_text_atomic(  # a report is replaced whole or not at all
        out.with_suffix(".json"),
        json.dumps({"runs": rows, "decode": decode, "samples": samples, "contexts": contexts}, indent=1),
    )
    lines = [] if args.no_table else [
        "| model | " + " | ".join(STAGES) + " | transfer tokens, s | distill tokens, s |",
        "|---" * 8 + "|",
    ]  # fmt: skip
    for r in [] if args.no_table else rows:
        ppl, sec, tok = r["perplexity"], r["seconds"], r["tokens"]
        cells = [f"{ppl[k]:.2f}" if k in ppl and ppl[k] < 1e4 else (f"{ppl[k]:.3g}" if k in ppl else "-")
                 for k in STAGES]  # fmt: skip
        lines.append(f"| {_label(r)} | " + " | ".join(cells) +
                     f" | {tok.get('transfer', 0):,}, {sec.get('transfer', 0):.0f} | "
                     f"{tok.get('distill', 0):,}, {sec.get('distill', 0):.0f} |")  # fmt: skip
    if decode:
        lines += [
            "",
            "| model | context | prefill s | decode tokens/s | state bytes |",
            "|---|---|---|---|---|",
        ]
        lines += [f"| {_label(d)} | {d['context']} | {d['prefill_s']:.1f} | {d['decode_tokens_per_s']:.2f} | "
                  f"{d['state_bytes']:,} |" for d in decode]  # fmt: skip
    if contexts:
        lines += [
            "",
            f"| model | context | windows of it in the first {held.numel() - 1:,} held-out tokens | perplexity | "
            "second half of each window |",
            "|---|---|---|---|---|",
        ]
        lines += [f"| {_label(d)} | {d['context']} | {d['windows']} | {d['perplexity']:.2f} | "
                  f"{d['second_half']:.2f} |" for d in contexts]  # fmt: skip
    for d in samples:
        lines += ["", f"**{_label(d)}**, greedy after {d['prompt']!r}: {d['continuation']!r}"]
    write_text_atomic(out.with_suffix(".table.md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


def _label(entry: dict) -> str:
    """A table's name for a model: its description, and the run directory's name where it has one."""
    run = entry.get("run")
    return entry["model"] + (f" (`{Path(run).name}`)" if run else "")


if __name__ == "__main__":
    main()
