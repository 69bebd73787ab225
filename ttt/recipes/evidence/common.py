"""What the evidence recipes share: one trained LM per (configuration, lr, seed), scored by position,
cached as JSON so an interrupted experiment resumes where it stopped; the lr sweep (tune on the first
seed, run the other seeds at the best lr, as Zoology does); output files. Cache files and run locks:
``cache.py``; mean and spread over seeds: ``stats.py``.

Every run is ``ttt.recipes.train.train`` with ``TrainArgs`` (the ``ttt train`` loop), then
``ttt.recipes.eval.evaluate_loss`` on the validation split at each evaluation context. Shapes: T tokens.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ttt.models.checkpoint import write_text_atomic
from ttt.recipes.args import Parser, TrainArgs, positive_int
from ttt.recipes.common import format_table, save_plot, set_threads

from .cache import RunBusy, read_cache, run_once

__all__ = [
    "RunSpec",
    "Scale",
    "base_parser",
    "cached_run",
    "run_one",
    "scale_from_args",
    "sweep",
    "write_outputs",
]

LN2 = math.log(2.0)


@dataclass(frozen=True)
class RunSpec:
    """One model configuration of an experiment: a mixer and its constructor arguments."""

    label: str
    """name in tables and plots (also the cache file's stem: letters, digits, ``-_.`` only)"""
    mixer: str
    """a name in ``ttt.layers.MIXERS``"""
    mixer_kwargs: dict[str, Any] = field(default_factory=dict)
    """extra constructor arguments of that mixer (``--mixer-kwargs``)"""


@dataclass(frozen=True)
class Scale:
    """The training and evaluation budget every run of an experiment shares."""

    preset: str = "tiny"
    steps: int = 600
    batch_size: int = 16
    context: int = 128
    eval_contexts: tuple[int, ...] = (128, 1024)
    """windows of these lengths are scored position by position after training"""
    eval_tokens: int = 131072
    """validation tokens scored per evaluation context (windows = eval_tokens // context)"""
    eval_batch_tokens: int = 8192
    """tokens per evaluation batch"""
    threads: int = 1
    match_params: str = "attention"
    corpus: str = "shakespeare"
    """``ttt train --corpus``: a corpus name or a text file / directory"""


def base_parser(description: str, default_out: str) -> argparse.ArgumentParser:
    """The options every evidence recipe has (its own are added by the caller)."""
    p = Parser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--out",
        default=None,
        help=f"results directory (default: {default_out}; with --quick: runs/evidence-quick/...)",
    )
    p.add_argument("--seeds", type=seed_list, default="0,1,2", help="comma-separated seeds (default: 0,1,2)")
    p.add_argument(
        "--lrs", type=lr_list, default="3e-3", help="lr grid, tuned on the first seed (default: 3e-3)"
    )
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the experiment's)")
    p.add_argument("--only", default=None, help="comma-separated labels: run only these configurations")
    p.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads (default: 1)")
    p.add_argument("--corpus", default="shakespeare", help="ttt train --corpus (default: shakespeare)")
    p.add_argument("--quick", action="store_true", help="micro model, a few steps: checks the pipeline only")
    p.add_argument("--report-only", action="store_true", help="write the outputs from the cached runs only")
    return p


def scale_from_args(args: argparse.Namespace, full: Scale) -> Scale:
    """``full``, or the seconds-long ``--quick`` scale; ``--steps`` and ``--threads`` override."""
    scale = full
    if args.quick:
        ratio = max(1, full.eval_contexts[-1] // full.context)
        scale = Scale(preset="micro", steps=3, batch_size=2, context=64,
                      eval_contexts=tuple(dict.fromkeys((64, 64 * ratio))), eval_tokens=64 * ratio * 2,
                      eval_batch_tokens=64 * ratio * 2)  # fmt: skip
    if args.steps is not None:
        scale = dataclasses.replace(scale, steps=args.steps)
    return dataclasses.replace(scale, threads=args.threads, corpus=args.corpus)


def _float_list(text: str, positive: bool, example: str) -> list[float]:
    try:
        values = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        values = []
    if not values or not all(math.isfinite(v) and (v > 0 if positive else v >= 0) for v in values):
        kind = "positive" if positive else "non-negative"
        raise argparse.ArgumentTypeError(f"expected {kind} numbers such as {example}, got {text!r}")
    return values


def lr_list(text: str) -> list[float]:
    """``--lrs``: ``"1e-3,3e-3"`` -> ``[0.001, 0.003]``; positive finite numbers (argparse reports errors)."""
    return _float_list(text, True, "1e-3,3e-3")


def factor_list(text: str) -> list[float]:
    """``"0,0.5,2"`` -> ``[0.0, 0.5, 2.0]``: non-negative finite factors (argparse reports errors)."""
    return _float_list(text, False, "0,0.5,2")


def command_line(name: str, argv: list[str] | None) -> str:
    """The command that reproduces an experiment's outputs, for its report: ``python -m
    ttt.recipes.evidence.<name>`` and the arguments given (``argv``, else the process's own), shell-quoted."""
    import shlex

    args = argv if argv is not None else sys.argv[1:]
    return " ".join(["python", "-m", f"ttt.recipes.evidence.{name}", *map(shlex.quote, args)])


def _int_list(text: str, least: int, example: str) -> list[int]:
    try:
        values = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        values = []
    if not values or min(values) < least:
        kind = "non-negative" if least == 0 else "positive"
        raise argparse.ArgumentTypeError(f"expected {kind} integers such as {example}, got {text!r}")
    return values


def seed_list(text: str) -> list[int]:
    """``--seeds``: one or more non-negative integers, comma-separated (argparse reports the error)."""
    return _int_list(text, 0, "0,1,2")


def width_list(text: str) -> list[int]:
    """``--widths``: one or more positive integers, comma-separated (argparse reports the error)."""
    return _int_list(text, 1, "64,128")


def check_only(only: str | None, labels: list[str]) -> None:
    """``--only``: stop (one line, the known labels) when it names a configuration the experiment lacks."""
    unknown = sorted(set(only.split(",")) - set(labels)) if only is not None else []
    if unknown:
        raise SystemExit(f"--only: unknown label(s) {', '.join(unknown)}; choose from {', '.join(labels)}")


def out_dir(args: argparse.Namespace, name: str) -> Path:
    """``--out``, or ``benchmarks/results/evidence/<name>`` (``runs/evidence-quick/<name>`` with --quick)."""
    if args.out:
        return Path(args.out)
    return Path("runs/evidence-quick" if args.quick else "benchmarks/results/evidence") / name


def run_experiment(
    name: str, argv: list[str] | None, args: argparse.Namespace, specs: list[RunSpec], scale: Scale, summarise
) -> dict:
    """Train the ``--only`` subset of ``specs`` (all by default), then report on every cached run of
    ``specs``: ``summarise(records, specs, scale) -> (markdown, summary, plots)`` is written to
    ``<out>/<name>.{md,json}`` and its PNGs. Returns the summary."""
    check_only(args.only, [spec.label for spec in specs])
    out = out_dir(args, name)
    seeds, lrs = args.seeds, args.lrs
    chosen = [s for s in specs if args.only is None or s.label in args.only.split(",")]
    if not args.report_only:
        sweep(chosen, lrs=lrs, seeds=seeds, scale=scale, out=out)
    records = sweep(specs, lrs=lrs, seeds=seeds, scale=scale, out=out, report_only=True)
    md, summary, plots = summarise(records, specs, scale)
    command = command_line(name, argv)
    write_outputs(
        out,
        name,
        markdown=f"{md}\nCommand (last invocation): `{command}`\n",
        payload={"command": command, "summary": summary, "records": [_report(r) for r in records]},
        plots=plots,
    )
    print(md)
    return summary


def _report(record: dict) -> dict:
    """A run's record for the experiment's JSON: everything but the per-position losses, which stay in
    its cache file (named here, relative to the results directory)."""
    slim = {k: v for k, v in record.items() if k != "by_position"}
    name = _cache_name(record["spec"]["label"], record["lr"], record["seed"])
    return {**slim, "by_position": f"cache/{name}.json"}


def _plain(obj: Any) -> Any:
    """A dataclass as its JSON round trip (tuples become lists), for comparing with a cached record."""
    return json.loads(json.dumps(dataclasses.asdict(obj)))


def _same_scale(cached: dict | None, scale: Scale) -> bool:
    """Whether a cached record was made at ``scale`` (a field the record predates counts as its default)."""
    if cached is None:
        return False
    defaults = _plain(Scale())
    return all(cached.get(k, defaults[k]) == v for k, v in _plain(scale).items())


def _cache_name(label: str, lr: float, seed: int) -> str:
    return f"{label}-lr{lr:g}-s{seed}"


_DATA: dict[tuple[str, str], Any] = {}


def _validation(corpus: str, tokenizer: Any) -> Any:
    from ttt.data import load_corpus, prepare

    key = (corpus, json.dumps(tokenizer.to_dict(), sort_keys=True))
    if key not in _DATA:
        _DATA[key] = prepare(load_corpus(corpus), tokenizer)
    return _DATA[key]


def run_one(spec: RunSpec, *, lr: float, seed: int, scale: Scale, out: Path, keep: bool = True) -> dict:
    """Train one model and score it by position; returns (and caches in ``out/cache``) its record.

    The record: the spec, lr, seed, scale, parameters, training seconds, final validation loss of
    ``ttt train`` and, per evaluation context T, ``by_position[T]``: mean loss (nats) at each of the
    T positions. ``keep``: keep the checkpoint in ``out/ckpt`` (for probes), else delete it."""
    from ttt.models.checkpoint import find_checkpoint, load_model

    cache = out / "cache" / f"{_cache_name(spec.label, lr, seed)}.json"
    run_dir = out / "ckpt" / _cache_name(spec.label, lr, seed)
    record = run_once(  # RunBusy when another process trains this run
        cache,
        lambda: cached_run(spec, lr=lr, seed=seed, scale=scale, out=out),
        lambda: _train_and_score(
            spec, lr=lr, seed=seed, scale=scale, run_dir=run_dir, cache=cache, keep=keep
        ),
    )
    if "token_eta" not in record and (run_dir / "latest").exists():  # a record older than the field
        record["token_eta"] = learned_token_eta(load_model(find_checkpoint(run_dir))[0])
        write_text_atomic(cache, json.dumps(record) + "\n")
    return record


def cached_run(spec: RunSpec, *, lr: float, seed: int, scale: Scale, out: Path) -> dict | None:
    """The cached record of one run when the same spec and scale made it, else None."""
    record = read_cache(out / "cache" / f"{_cache_name(spec.label, lr, seed)}.json")
    if record is None or not _same_scale(record.get("scale"), scale) or record.get("spec") != _plain(spec):
        return None
    return record


def _train_and_score(
    spec: RunSpec, *, lr: float, seed: int, scale: Scale, run_dir: Path, cache: Path, keep: bool
) -> dict:
    from ttt.data import tokenizer_from_dict
    from ttt.models.checkpoint import find_checkpoint, load_model
    from ttt.recipes.eval import evaluate_loss
    from ttt.recipes.train import train

    args = train_args(spec, scale, lr, seed, run_dir)
    set_threads(scale.threads)  # for the scoring too: train() gives back the count it found
    t0, cpu0 = time.perf_counter(), time.process_time()
    result = train(args)
    model, meta = load_model(find_checkpoint(run_dir))
    data = _validation(args.corpus, tokenizer_from_dict(meta["tokenizer"]))
    by_position = {}
    for ctx in scale.eval_contexts:
        _, pos = evaluate_loss(model, data.validation, batch_size=max(1, scale.eval_batch_tokens // ctx),
                               context=ctx, max_batches=max(1, scale.eval_tokens // scale.eval_batch_tokens),
                               device=torch.device("cpu"))  # fmt: skip
        by_position[str(ctx)] = [round(v, 5) for v in pos.tolist()]
    record = {
        "spec": dataclasses.asdict(spec),
        "lr": lr,
        "seed": seed,
        "scale": dataclasses.asdict(scale),
        "num_params": result.num_params,
        "train_seconds": round(result.seconds, 1),
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "cpu_seconds": round(time.process_time() - cpu0, 1),
        "val_loss": result.val_loss,
        "val_bits_per_byte": result.val_bits_per_byte,
        "bits_per_nat": data.bits_per_byte(1.0),
        "by_position": by_position,
        "token_eta": learned_token_eta(model),
    }
    if not keep:
        import shutil

        shutil.rmtree(run_dir, ignore_errors=True)
    cache.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(cache, json.dumps(record) + "\n")
    return record


def train_args(spec: RunSpec, scale: Scale, lr: float, seed: int, run_dir: Path) -> TrainArgs:
    """The ``ttt train`` arguments of one run. A spec names the layer's own constructor defaults: the
    mixer settings ``ttt train`` adds by default (``TRAIN_MIXER_DEFAULTS``, e.g. TTT's short convolutions)
    are pinned back to the layer's values unless the spec sets them, and so are the parameter-matching
    reference's, so a label (and the size it is matched to) keeps its meaning when ``ttt train``'s
    defaults change."""
    import inspect

    from ttt.layers import mixer_parameters
    from ttt.recipes.train import TRAIN_MIXER_DEFAULTS

    def layer_defaults(mixer: str) -> dict[str, Any]:  # of the most derived __init__ declaring each name
        params = mixer_parameters(mixer)
        for name in TRAIN_MIXER_DEFAULTS.get(mixer, {}):
            if name not in params or params[name].default is inspect.Parameter.empty:
                raise ValueError(f"{mixer} has no default for {name!r}")
        return {name: params[name].default for name in TRAIN_MIXER_DEFAULTS.get(mixer, {})}

    kwargs = {**layer_defaults(spec.mixer), **spec.mixer_kwargs}
    mixer_kwargs = {spec.mixer: kwargs} if kwargs else {}
    reference = scale.match_params
    if reference and reference.lower() != "none" and reference != spec.mixer:
        pinned = layer_defaults(reference)
        if pinned:
            mixer_kwargs[reference] = pinned
    margs = dict(mixer=spec.mixer, preset=scale.preset, corpus=scale.corpus, match_params=scale.match_params)
    return TrainArgs(**margs,
                     mixer_kwargs=json.dumps(mixer_kwargs) if mixer_kwargs else None,
                     steps=scale.steps, batch_size=scale.batch_size, context=scale.context, lr=lr, seed=seed,
                     eval_every=0, ckpt_every=0, out=str(run_dir), overwrite=True, progress=False, plot=False,
                     threads=scale.threads)  # fmt: skip


def learned_token_eta(model: torch.nn.Module) -> list[list[float]] | None:
    """``token_eta`` (base + learned offset) of every TTT block after training, or None without TTT."""
    etas = [b.mixer.token_eta().detach().tolist() for b in model.blocks if hasattr(b.mixer, "token_eta")]
    return [[round(v, 4) for v in e] for e in etas] or None


def sweep(
    specs: list[RunSpec], *, lrs: list[float], seeds: list[int], scale: Scale, out: Path, keep: bool = True,
    report_only: bool = False,
) -> list[dict]:  # fmt: skip
    """Every spec: the first seed at every lr, then the other seeds at the lr with the lowest validation
    loss. ``report_only``: no training, return the cached records only. Returns all records."""
    records = []

    def get(spec: RunSpec, lr: float, seed: int) -> dict | None:
        if report_only:
            return cached_run(spec, lr=lr, seed=seed, scale=scale, out=out)
        print(
            f"[{time.strftime('%H:%M:%S')}] {spec.label} lr {lr:g} seed {seed}", file=sys.stderr, flush=True
        )
        return run_one(spec, lr=lr, seed=seed, scale=scale, out=out, keep=keep)

    for spec in specs:
        try:
            tuned = [r for r in (get(spec, lr, seeds[0]) for lr in lrs) if r is not None]
            if not tuned:
                continue
            best = min(tuned, key=lambda r: r["val_loss"])
            for r in tuned:
                r["best_lr"] = r is best
            records += tuned
            for seed in seeds[1:]:
                r = get(spec, best["lr"], seed)
                if r is not None:
                    r["best_lr"] = True
                    records.append(r)
        except RunBusy as e:  # the other process goes on with this configuration
            print(f"skipped the rest of {spec.label}: {e}", file=sys.stderr, flush=True)
    return records


def at_best_lr(records: list[dict], label: str) -> list[dict]:
    """The records of ``label`` at its tuned lr (one per seed)."""
    return [r for r in records if r["spec"]["label"] == label and r.get("best_lr")]


def scored_at_best_lr(runs: list[dict], ctx: str) -> dict:
    """The summary entry of one configuration's ``runs`` at its tuned lr: bits/byte of every seed scored on
    the ``ctx``-token evaluation windows (``eval_bits_per_byte``) beside ``ttt train``'s validation figure."""
    bpn = runs[0]["bits_per_nat"]
    return {
        "spec": runs[0]["spec"],
        "lr": runs[0]["lr"],
        "seeds": [r["seed"] for r in runs],
        "num_params": runs[0]["num_params"],
        "val_bits_per_byte": [r["val_bits_per_byte"] for r in runs],
        "eval_bits_per_byte": [sum(r["by_position"][ctx]) / len(r["by_position"][ctx]) * bpn for r in runs],
        "train_seconds": [r["train_seconds"] for r in runs],
    }


def write_outputs(out: Path, name: str, *, markdown: str, payload: dict, plots: dict[str, dict]) -> None:
    """``out/name.md``, ``out/name.json`` and one PNG per ``plots`` entry (``{stem: save_plot kwargs}``)."""
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / f"{name}.md", markdown)
    write_text_atomic(out / f"{name}.json", json.dumps(payload, indent=1) + "\n")
    for stem, kwargs in plots.items():
        save_plot(out / f"{stem}.png", **kwargs)


def table(header: list[str], rows: list[list[Any]]) -> str:
    return format_table(header, rows)
