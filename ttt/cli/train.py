"""``ttt train``: train a language model (see :func:`ttt.recipes.train.train`)."""

from __future__ import annotations

from ttt.models.config import PRESETS
from ttt.recipes.args import TrainArgs

EPILOG = """examples:
  # the README's main command: TTT-Linear, tiny preset, Shakespeare plays, one CPU thread
  ttt train
  # two threads, when both cores are yours alone (on a busy machine one thread is faster)
  ttt train --threads 2 --out runs/two-threads

  # the same shape with attention, TTT-MLP or a hybrid, at the attention model's parameter count
  ttt train --mixer attention
  ttt train --mixer ttt_mlp --out runs/mlp
  ttt train --layer-mixers ttt_linear,attention,ttt_linear,attention --out runs/hybrid

  # continue a run exactly where its last checkpoint left it
  ttt train --out runs/ttt_linear-tiny --resume

  # BPE tokens, another corpus, a paper-sized model on a GPU (bfloat16), 8 GPUs with torchrun
  ttt train --tokenizer bpe --vocab-size 2048 --corpus python-stdlib --out runs/bpe-stdlib
  ttt train --preset 125m --context 2048 --batch-size 32 --dtype bfloat16 --device cuda
  torchrun --nproc_per_node 8 -m ttt.cli.main train --preset 125m --batch-size 256 --out runs/125m-8gpu
"""
HELP = "train a TTT (or attention) language model"
ARGS = TrainArgs
OPTIONS = {"notes": {"preset": "one of " + ", ".join(PRESETS)}}


def run(args: TrainArgs) -> int:
    from ttt.recipes.train import train

    train(args)
    return 0
