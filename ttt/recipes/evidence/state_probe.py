"""Why does a TTT model's loss rise beyond its training context? Probes on one trained checkpoint.

    python -m ttt.recipes.evidence.state_probe --checkpoint runs/ttt_linear-tiny --context 1024
    python -m ttt.recipes.evidence.state_probe --quick                 # pipeline check, seconds

Reads validation windows of ``--context`` tokens one mini-batch (b tokens) at a time, carrying the state,
and records per band of positions (a band = the training context): the loss, and the distance of every
TTT block's fast weights from their learned start, ``||W_t - W0||_F`` (mean over blocks, heads and
windows; ``||W0||_F`` is printed beside it). The same windows are then scored under eval-time
interventions that keep the weights of the model:

- ``lr x s``: the inner learning rate scaled by s (``base_lr``), every position;
- ``decay g``: after every mini-batch, ``W <- W0 + g (W - W0)`` (a forgetting the model never trained with);
- ``reset C``: the fast weights and conv caches return to their start every C tokens (C = the training
  context): the loss the model has at positions it was trained on, laid end to end.

If the rise comes from the fast weights drifting past the distances seen in training, decay and reset
flatten it and the distance keeps growing past the training context; if it comes from elsewhere (the
inner LayerNorm's or the lr gate's inputs), they do not.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F

from ttt.recipes.args import Parser
from ttt.recipes.common import set_threads

from .common import command_line, positive_int, table, write_outputs

__all__ = ["main", "probe"]

NAME = "state_probe"


def _ttt_blocks(model: torch.nn.Module) -> list[int]:
    from ttt.layers.ttt import _TTTLayer

    return [i for i, b in enumerate(model.blocks) if isinstance(b.mixer, _TTTLayer)]


@torch.no_grad()
def probe(
    model: torch.nn.Module,
    windows: torch.Tensor,
    *,
    band: int,
    lr_scale: float = 1.0,
    decay: float = 1.0,
    reset_every: int | None = None,
) -> dict:
    """Score ``windows [N, T+1]`` mini-batch by mini-batch. Returns ``loss [T]`` (nats, mean over windows)
    and ``drift [T // b]`` (fast-weight distance ``||W - W0||_F`` after each mini-batch, all fast-weight
    tensors of a head together, mean over TTT blocks, heads and windows), ``w0_norm`` (``||W0||_F``, mean
    over blocks and heads)."""
    from ttt.ops.types import TTTState

    blocks = _ttt_blocks(model)
    if not blocks:
        raise ValueError("state_probe needs a model with TTT blocks (ttt_linear / ttt_mlp)")
    mixers = [model.blocks[i].mixer for i in blocks]
    b = mixers[0].mini_batch_size
    if any(m.mini_batch_size != b for m in mixers) or band % b:
        raise ValueError(f"every TTT block needs one mini-batch size dividing the band {band}")
    saved_lr = [m.base_lr for m in mixers]
    for m in mixers:
        m.base_lr = m.base_lr * lr_scale
    x, y = windows[:, :-1], windows[:, 1:]
    length = x.shape[1]
    losses, drift = [], []
    state = model.init_state(x.shape[0])
    try:
        for start in range(0, length, b):
            if reset_every and start % reset_every == 0:
                state = model.init_state(x.shape[0])
            logits, state = model(x[:, start : start + b], state)
            losses.append(F.cross_entropy(logits.transpose(1, 2), y[:, start : start + b], reduction="none"))
            dist = []
            for i, m in zip(blocks, mixers):
                st = state[i].ttt
                w0 = [w.to(st.weights[0].dtype) for w in m.fast_weights()]
                new = (
                    tuple(a + decay * (w - a) for w, a in zip(st.weights, w0)) if decay != 1.0 else st.weights
                )
                if decay != 1.0:
                    zeros = tuple(torch.zeros_like(w) for w in new)
                    state[i] = dataclasses.replace(
                        state[i], ttt=TTTState(new, new, zeros, 0, st.mini_batch_size, st.variant)
                    )
                num = sum(((w - a) ** 2).sum(dim=tuple(range(2, w.dim()))) for w, a in zip(new, w0))
                dist.append(num.sqrt().mean())
            drift.append(float(torch.stack(dist).mean()))
    finally:
        for m, lr in zip(mixers, saved_lr):
            m.base_lr = lr
    w0_norm = torch.stack([sum((w**2).sum(dim=tuple(range(1, w.dim())))
                               for w in m.fast_weights()).sqrt().mean()
                           for m in mixers]).mean()  # fmt: skip
    loss = [round(v, 5) for v in torch.cat(losses, dim=1).mean(0).tolist()]
    return {"loss": loss, "drift": [round(v, 5) for v in drift], "w0_norm": float(w0_norm),
            "mini_batch_size": b}  # fmt: skip


def _band_means(values: list[float], width: int) -> list[float]:
    return [sum(values[i : i + width]) / len(values[i : i + width]) for i in range(0, len(values), width)]


def main(argv: list[str] | None = None) -> dict:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="run or checkpoint directory of a TTT model")
    p.add_argument("--context", type=int, default=1024, help="window length (default 1024)")
    p.add_argument("--windows", type=int, default=64, help="validation windows (default 64)")
    p.add_argument("--band", type=int, default=None, help="band width (default: the training context)")
    p.add_argument("--out", default=None, help="output directory (default: next to the checkpoint)")
    p.add_argument("--threads", type=positive_int, default=1)
    p.add_argument("--quick", action="store_true", help="an untrained micro model: checks the pipeline")
    args = p.parse(argv)
    set_threads(args.threads)
    from ttt.data import load_corpus, prepare, tokenizer_from_dict

    if args.quick:
        from ttt.models import CausalLM, LMConfig

        torch.manual_seed(0)
        model = CausalLM(LMConfig.from_name("micro", vocab_size=256)).eval()
        tokens = torch.randint(0, 256, (4 * 128 + 1,))
        context, band, n = 128, 32, 4
        label = "micro (untrained)"
        out = Path(args.out or "runs/evidence-quick/state_probe")
    else:
        from ttt.models.checkpoint import find_checkpoint, load_model

        if not args.checkpoint:
            p.error("--checkpoint is required (or --quick)")
        ckpt = find_checkpoint(args.checkpoint)
        model, meta = load_model(ckpt)
        model.eval()
        data = prepare(
            load_corpus(meta["args"].get("corpus", "shakespeare")), tokenizer_from_dict(meta["tokenizer"])
        )
        tokens, context, n = data.validation, args.context, args.windows
        band = args.band or int(meta["args"].get("context", 128))
        label = str(ckpt)
        out = Path(args.out or ckpt.parent)
    windows = torch.stack([tokens[i * context : (i + 1) * context + 1] for i in range(n)])
    probes = {
        "plain": {},
        "lr x 0.5": {"lr_scale": 0.5},
        "lr x 0.25": {"lr_scale": 0.25},
        "decay 0.98": {"decay": 0.98},
        "decay 0.9": {"decay": 0.9},
        f"reset {band}": {"reset_every": band},
    }
    results = {name: probe(model, windows, band=band, **kw) for name, kw in probes.items()}
    b = results["plain"]["mini_batch_size"]
    bands = [f"{i}-{i + band - 1}" for i in range(0, context, band)]
    loss_rows = [[name, *(f"{v:.3f}" for v in _band_means(r["loss"], band))] for name, r in results.items()]
    drift_rows = [
        [name, *(f"{v:.3f}" for v in _band_means(r["drift"], band // b))] for name, r in results.items()
    ]
    md = "\n\n".join([
        "# Fast-weight state beyond the training context",
        f"Checkpoint: `{label}`; {n} validation windows of {context} tokens, bands of {band} positions.",
        "Loss (nats/token) per band:",
        table(["probe", *bands], loss_rows),
        f"Distance of the fast weights from their start, ||W - W0||_F (mean over TTT blocks, heads, windows "
        f"and the mini-batches of the band; ||W0||_F = {results['plain']['w0_norm']:.3f}):",
        table(["probe", *bands], drift_rows),
    ]) + "\n"  # fmt: skip
    xs = [band * (i + 0.5) for i in range(context // band)]
    plots = {
        f"{NAME}_loss": dict(series={k: (xs, _band_means(r["loss"], band)) for k, r in results.items()},
                             xlabel="token position", ylabel="loss (nats/token)", title="Loss by band"),
        f"{NAME}_drift": dict(series={k: (xs, _band_means(r["drift"], band // b))
                                      for k, r in results.items()},
                              xlabel="token position", ylabel="||W - W0||_F", title="Fast-weight drift"),
    }  # fmt: skip
    command = command_line(NAME, argv)
    write_outputs(out, NAME, markdown=md + f"\nCommand: `{command}`\n",
                  payload={"command": command, "checkpoint": label, "context": context, "band": band,
                           "windows": n, "probes": results}, plots=plots)  # fmt: skip
    print(md)
    return results


if __name__ == "__main__":
    main()
