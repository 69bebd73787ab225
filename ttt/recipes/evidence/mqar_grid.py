"""Recall against state size (Zoology's figure): MQAR accuracy of every mixer, with and without its short
convolutions, at two widths, against the bytes of its decoding state.

    python -m ttt.recipes.evidence.mqar_grid --lrs 3e-4,1e-3,3e-3 --seeds 0,1,2
    python -m ttt.recipes.evidence.mqar_grid --only ttt_linear,ttt_linear+conv --widths 64 --seeds 0
    python -m ttt.recipes.evidence.mqar_grid --quick                     # pipeline check, seconds

One model per (mixer, convolutions on/off, width d, lr, seed), trained by ``ttt.recipes.mqar.train_mqar``
on all slices at once and scored per slice, as Zoology trains one model on a mixture of lengths:
(T, D) = (64, 4), (64, 16), (256, 16), (256, 64), (512, 64) (key-value pairs up to 64), V = 8192 as
Zoology (the ``--vocab`` option lowers it), 2 blocks, 2 heads. The lr is tuned per (mixer, convolutions,
width) on the first seed and the other seeds run at the best (Zoology reports the best of 4 lrs). State
size: ``ttt.models.state_nbytes`` of the model's decoding state after one sequence of the longest T, batch
1 (a KV cache for attention: it grows with T). Mixers without a convolution switch run once (Mamba2 keeps
its convolution: it has no switch); attention and sliding-window attention get short convolutions of 4
taps on q, k, v (``conv_size=4``) as ``+conv``, as Zoology's config B gives every mixer one.
Sliding-window attention runs with a 64-token window (its default, 512, would make it full attention at
every T of the grid). The default ``--mixers`` is every mixer of
``ttt.layers.MIXERS``: Longhorn, RWKV-7 and KDA train 3-45x slower than TTT-Linear on a CPU (recurrent forms).

Writes ``mqar_grid.{md,json}`` (a column per slice), ``mqar_grid.png`` (accuracy against state bytes, one
line per mixer and convolution setting through its widths) and ``mqar_grid_hardest.png`` (the same for the
last slice) into ``--out``; cached runs in ``--out/cache``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from ttt.layers import MIXERS as ALL_MIXERS
from ttt.models.checkpoint import write_text_atomic
from ttt.recipes.args import Parser
from ttt.recipes.common import set_threads
from ttt.recipes.mqar import MQARArgs, build_model, check_args, make_splits, mixer_names, train_mqar

from .cache import RunBusy, read_cache, run_once
from .common import (
    check_only,
    command_line,
    lr_list,
    out_dir,
    positive_int,
    seed_list,
    table,
    width_list,
    write_outputs,
)
from .stats import fmt_ms, mean_spread

__all__ = ["CONV_OFF", "CONV_ON", "main", "variants"]

NAME = "mqar_grid"

#: constructor arguments that turn a mixer's short convolutions on / off (mixers absent have no switch)
CONV_ON = {
    "ttt_linear": {"share_qk": True},
    "ttt_mlp": {"share_qk": True},
    "attention": {"conv_size": 4},
    "swa": {"conv_size": 4},
}
CONV_OFF = {m: {"conv_size": 0} for m in ("deltanet", "gated_deltanet", "kda", "longhorn", "comba")}
#: constructor arguments every variant of a mixer gets: sliding-window attention's default window (512)
#: covers every T of the grid, so it would be full attention; 64 tokens makes it a fixed-size state
BASE = {"swa": {"window": 64}}

FULL_SLICES = ("64,64,256,256,512", "4,16,16,64,64")
MIXERS = tuple(ALL_MIXERS)


def variants(mixers: list[str]) -> list[tuple[str, str, dict]]:
    """``(label, mixer, kwargs)``: every mixer at its default, plus its convolution switch flipped where
    it has one (label suffix ``+conv`` / ``-conv``)."""
    out = []
    for m in mixers:
        base = BASE.get(m, {})
        out.append((m, m, base))
        if m in CONV_ON:
            out.append((f"{m}+conv", m, {**base, **CONV_ON[m]}))
        if m in CONV_OFF:
            out.append((f"{m}-conv", m, {**base, **CONV_OFF[m]}))
    return out


def _state_bytes(model: torch.nn.Module, seq_len: int) -> int:
    from ttt.models import state_nbytes

    with torch.no_grad():
        _, state = model(torch.zeros(1, seq_len, dtype=torch.long))
    return state_nbytes(state)


def run_one(
    label: str, mixer: str, kwargs: dict, base: MQARArgs, out: Path, data: dict, report_only: bool = False
) -> dict | None:
    """Train and score one model (cached in ``out/cache``); a cached record counts only when the same
    options made it. ``report_only``: never train (None when there is no such record)."""
    args = dataclasses.replace(base, mixer_kwargs=json.dumps({mixer: kwargs}) if kwargs else None)
    key = f"{label}-d{args.dim}-lr{args.lr:g}-s{args.seed}"
    cache = out / "cache" / f"{key}.json"
    plain = json.loads(
        json.dumps(dataclasses.asdict(dataclasses.replace(args, threads=None, progress=False)))
    )

    def cached() -> dict | None:
        record = read_cache(cache)
        return record if record is not None and record.get("args") == plain else None

    if report_only:
        return cached()

    def train_it() -> dict:
        print(f"[{time.strftime('%H:%M:%S')}] {key}", file=sys.stderr, flush=True)
        if args.seed not in data:
            data[args.seed] = make_splits(args)
        train, test = data[args.seed]
        result = train_mqar(mixer, args, train, test)
        torch.manual_seed(args.seed)
        model = build_model(mixer, args, max_seq_len=max(t for t, _ in train))
        record = {"label": label, "mixer": mixer, "args": plain, **dataclasses.asdict(result),
                  "state_bytes": _state_bytes(model, max(t for t, _ in train))}  # fmt: skip
        cache.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(cache, json.dumps(record) + "\n")
        return record

    return run_once(cache, cached, train_it)  # RunBusy when another process trains this run


def _parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--out", default=None, help=f"results directory (default: benchmarks/results/evidence/{NAME})"
    )
    p.add_argument("--mixers", default=",".join(MIXERS), help="comma-separated mixers")
    p.add_argument("--only", default=None, help="comma-separated labels (e.g. ttt_linear+conv) to train")
    p.add_argument("--widths", type=width_list, default="64,128", help="model widths d (default 64,128)")
    p.add_argument("--seq-len", default=FULL_SLICES[0], help=f"T of each slice (default {FULL_SLICES[0]})")
    p.add_argument("--num-kv", default=FULL_SLICES[1], help=f"D of each slice (default {FULL_SLICES[1]})")
    p.add_argument("--vocab", type=int, default=8192, help="vocabulary V (default 8192, Zoology's)")
    p.add_argument("--train-examples", type=int, default=20000, help="training examples per slice")
    p.add_argument("--test-examples", type=int, default=1000, help="test examples per slice")
    p.add_argument("--epochs", type=int, default=16, help="epochs (early stop above 0.99)")
    p.add_argument("--lrs", type=lr_list, default="1e-3", help="lr grid, tuned on the first seed")
    p.add_argument("--seeds", type=seed_list, default="0,1,2")
    p.add_argument("--threads", type=positive_int, default=1)
    p.add_argument("--quick", action="store_true", help="tiny data and models: checks the pipeline only")
    p.add_argument("--report-only", action="store_true", help="write the outputs from the cached runs only")
    return p


def main(argv: list[str] | None = None) -> dict:
    a = _parser().parse(argv)
    if a.quick:
        a.mixers, a.widths, a.seq_len, a.num_kv, a.vocab = "ttt_linear,attention", [16], "32", "2", 64
        a.train_examples, a.test_examples, a.epochs, a.seeds = 16, 8, 1, [0]
    seeds, lrs, widths = a.seeds, a.lrs, a.widths
    base = MQARArgs(vocab=a.vocab, seq_len=a.seq_len, num_kv=a.num_kv, train_examples=a.train_examples,
                    test_examples=a.test_examples, epochs=a.epochs, threads=a.threads,
                    progress=False)  # fmt: skip
    try:  # every option checked before anything is trained or written
        for width in widths:
            check_args(dataclasses.replace(base, mixers=a.mixers, dim=width, lr=lrs[0]))
    except ValueError as e:
        raise SystemExit(f"python -m ttt.recipes.evidence.{NAME}: error: {e}") from None
    names = mixer_names(dataclasses.replace(base, mixers=a.mixers))
    check_only(a.only, [label for label, _, _ in variants(names)])
    out = out_dir(argparse.Namespace(out=a.out, quick=a.quick), NAME)
    set_threads(a.threads)
    data: dict = {}

    def collect(train: bool) -> list[dict]:
        """One record per (setting, width) with cached runs; ``train``: first train the ``--only`` runs
        it lacks (a setting another process is training is skipped, with a line)."""
        records = []
        for label, mixer, kwargs in variants(names):
            train_it = train and (a.only is None or label in a.only.split(","))
            for width in widths:

                def get(seed: int, lr: float) -> dict | None:
                    run_args = dataclasses.replace(base, dim=width, lr=lr, seed=seed)  # noqa: B023
                    return run_one(label, mixer, kwargs, run_args, out, data, not train_it)  # noqa: B023

                try:
                    tuned = [r for r in (get(seeds[0], lr) for lr in lrs) if r is not None]
                    if not tuned:
                        continue
                    best = max(tuned, key=lambda r: r["accuracy"])
                    runs = [best] + [r for r in (get(s, best["args"]["lr"]) for s in seeds[1:]) if r]
                except RunBusy as e:  # the other process goes on with this setting
                    print(f"skipped {label} at width {width}: {e}", file=sys.stderr, flush=True)
                    continue
                records.append({"label": label, "width": width, "lr": best["args"]["lr"],
                                "lr_grid_seed0": [(r["args"]["lr"], r["accuracy"]) for r in tuned],
                                "accuracy": [r["accuracy"] for r in runs],
                                "seeds": [r["args"]["seed"] for r in runs],
                                "slice_accuracy": [r["slice_accuracy"] for r in runs],
                                "state_bytes": best["state_bytes"], "num_params": best["num_params"],
                                "seconds": [r["seconds"] for r in runs]})  # fmt: skip
        return records

    if not a.report_only:
        collect(train=True)
    records = collect(train=False)  # the report: every cached run, also those another process made
    slice_names = list(records[0]["slice_accuracy"][0]) if records else []

    def slice_mean(r: dict, name: str) -> float:
        return mean_spread([acc[name] for acc in r["slice_accuracy"]])[0]

    rows = [[f"`{r['label']}`", r["width"], f"{r['state_bytes']:,}", f"{r['num_params']:,}",
             ", ".join(f"{lr:g}: {acc:.3f}" for lr, acc in r["lr_grid_seed0"]), f"{r['lr']:g}",
             fmt_ms(r["accuracy"]), *(f"{slice_mean(r, n):.3f}" for n in slice_names),
             f"{mean_spread(r['seconds'])[0]:.0f}"] for r in records]  # fmt: skip
    header = ["model", "width", "state bytes (T max)", "parameters", "seed 0 by lr", "lr", "accuracy",
              *slice_names, "train s"]  # fmt: skip
    md = "\n\n".join([
        "# MQAR accuracy against state size",
        f"Slices (T, D): {list(zip(a.seq_len.split(','), a.num_kv.split(',')))}, V = {a.vocab}, "
        f"{a.train_examples:,} training / {a.test_examples:,} test examples per slice, up to {a.epochs} "
        "epochs; "
        "accuracy: mean ± sd over seeds at the lr tuned on the first seed; per slice: mean over seeds.",
        table(header, rows),
    ]) + "\n"  # fmt: skip
    command = command_line(NAME, argv)
    plots = {}
    if records:  # accuracy over all slices, and on the last (hardest) slice, against state bytes
        for stem, what, y in (
            (NAME, "all slices", lambda r: mean_spread(r["accuracy"])[0]),
            (f"{NAME}_hardest", slice_names[-1], lambda r: slice_mean(r, slice_names[-1])),
        ):
            series: dict[str, tuple[list[float], list[float]]] = {}
            for r in records:
                xs, ys = series.setdefault(r["label"], ([], []))
                xs.append(r["state_bytes"])
                ys.append(y(r))
            plots[stem] = dict(
                series=series,
                xlabel="decoding state (bytes, log2)",
                logx=True,
                ylabel=f"MQAR accuracy ({what})",
                title=f"Recall ({what}) against state size",
            )
    write_outputs(
        out,
        NAME,
        markdown=md + f"\nCommand (last invocation): `{command}`\n",
        payload={"command": command, "summary": records},
        plots=plots,
    )
    print(md)
    return {"records": records}


if __name__ == "__main__":
    main()
