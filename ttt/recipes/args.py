"""Typed arguments of the recipes. The attribute docstrings are the ``--help`` text of the CLI."""

from __future__ import annotations

import ast
import dataclasses
import inspect
from dataclasses import dataclass
from functools import cache

__all__ = ["BenchArgs", "EvalArgs", "GenerateArgs", "TrainArgs", "field_docs"]


@dataclass
class TrainArgs:
    """Arguments of :func:`ttt.recipes.train.train`."""

    mixer: str = "ttt_linear"
    """mixer of every block (a name in ttt.layers.MIXERS)"""
    preset: str = "tiny"
    """model shape: a name in ttt.models.PRESETS (`ttt ls` shows each one's size)"""
    layer_mixers: str | None = None
    """comma-separated mixer per block for hybrids, e.g. 'ttt_linear,attention,ttt_linear,attention'
    (default: every block has --mixer)"""
    mixer_kwargs: str | None = None
    """JSON of extra constructor arguments per mixer, e.g. '{"ttt_linear": {"share_qk": true}}' (TTT's short
    convolutions, the paper's (M) variant)"""
    match_params: str | None = "attention"
    """resize the SwiGLU width so the model has the parameter count of this mixer's model ('none': off)"""
    corpus: str = "shakespeare"
    """corpus name (shakespeare, python-stdlib) or path to a text file / directory"""
    tokenizer: str = "bytes"
    """'bytes' (256 ids, bits per byte) or 'bpe' (byte-level BPE trained on the training split)"""
    vocab_size: int = 1024
    """BPE vocabulary size (ignored for bytes)"""
    steps: int = 600
    """optimizer steps"""
    batch_size: int = 16
    """sequences per step (global, over all processes)"""
    context: int = 128
    """tokens per training sequence"""
    lr: float = 3e-3
    """peak learning rate (AdamW)"""
    min_lr: float = 1e-5
    """final learning rate of the cosine schedule"""
    warmup: float = 0.1
    """linear warm-up, as a fraction of steps (< 1) or a number of steps (>= 1)"""
    weight_decay: float = 0.1
    """AdamW weight decay on matrices (not on norms, biases, gates)"""
    grad_clip: float = 1.0
    """clip the global gradient norm to this (0: off)"""
    eval_every: int = 200
    """validate every this many steps and at the end (0: only at the end)"""
    eval_batches: int = 16
    """validation batches per evaluation"""
    ckpt_every: int = 200
    """checkpoint every this many steps and at the end (0: only at the end); Ctrl-C saves the last step"""
    out: str | None = None
    """run directory for checkpoints and plots (default runs/<mixer>-<preset>)"""
    resume: bool = False
    """continue from the latest checkpoint in --out"""
    overwrite: bool = False
    """start over: delete the checkpoints, loss_curve.png, result.json and eval files of the run in --out
    (once every argument is checked; other files stay)"""
    seed: int = 0
    """seed of the initialisation and of the batch sampler"""
    device: str = "auto"
    """'auto' (CUDA when present, else CPU), 'cpu', 'cuda', 'cuda:1', ..."""
    dtype: str = "float32"
    """'float32', or 'bfloat16': torch.autocast mixed precision (matmuls in bfloat16, TTT inner loops in
    float32); saves time and memory on CUDA; accepted on CPU (CPU autocast) but usually slower there"""
    threads: int | None = None
    """torch CPU threads (default: torch's choice)"""
    progress: bool = True
    """show a progress bar when stderr is a terminal (there is a log line per validation either way)"""
    plot: bool = True
    """write loss_curve.png into the run directory at the end"""
    strategy: str = "ddp"
    """'ddp' (weights replicated on every process) or 'fsdp' (FSDP2: weights, gradients and optimizer state
    sharded; with --dtype bfloat16 the sharded weights stay float32 and compute runs in bfloat16; sharded
    checkpoints in <out>/dcp plus the usual safetensors export); one process runs either"""
    activation_checkpointing: bool = False
    """recompute each block's activations in the backward (less memory); with --strategy fsdp only"""
    context_parallel: int = 1
    """split every training sequence along T over this many processes (consecutive ranks; TTT-Linear /
    TTT-MLP mixers without share_qk; --context divisible by it); the processes are this many times the
    data-parallel groups (torchrun --nproc_per_node 4 with --context-parallel 2: 2 groups of 2)"""


@dataclass
class EvalArgs:
    """Arguments of :func:`ttt.recipes.eval.evaluate_checkpoint`."""

    checkpoint: str = ""
    """run directory or checkpoint directory"""
    corpus: str | None = None
    """corpus to evaluate on (default: the one it was trained on); only its validation split is scored:
    the last 10% of a text file's lines, every 10th file of a directory, the held-out plays / modules of a
    named corpus"""
    context: int | None = None
    """tokens per window (default: the training context); longer windows test length generalisation"""
    batch_size: int = 8
    """windows per batch"""
    max_batches: int | None = 32
    """stop after this many batches, >= 1 ('none': the whole validation split)"""
    bins: int = 16
    """number of position bins in the loss-vs-position table"""
    out: str | None = None
    """directory for eval-step-N.json and loss_by_position-step-N.md/.png, named by the checkpoint's
    step so evaluations of different checkpoints do not overwrite each other (default: the run directory
    of the checkpoint, or the checkpoint directory itself when it is not in a run directory)"""
    device: str = "auto"
    """'auto', 'cpu', 'cuda', ..."""
    threads: int | None = None
    """torch CPU threads (default: torch's choice)"""


@dataclass
class GenerateArgs:
    """Arguments of :func:`ttt.recipes.generate.generate_text`."""

    checkpoint: str = ""
    """run directory or checkpoint directory"""
    prompt: str | None = None
    """prompt text"""
    prompt_file: str | None = None
    """read the prompt from this file"""
    prompt_tokens: int | None = None
    """use the first N tokens of the validation split as the prompt (for speed measurements)"""
    prompts_file: str | None = None
    """one prompt per line: continue all of them as one batch (prompts of any lengths; not streamed)"""
    max_new_tokens: int = 200
    """tokens to generate"""
    temperature: float = 0.8
    """sampling temperature, >= 0 (0: greedy)"""
    top_k: int | None = 40
    """sample from the k most likely tokens, >= 1 ('none': all)"""
    seed: int = 0
    """sampling seed"""
    stream: bool = True
    """print tokens as they come"""
    device: str = "auto"
    """'auto', 'cpu', 'cuda', ..."""
    threads: int | None = None
    """torch CPU threads (default: torch's choice)"""


@dataclass
class BenchArgs:
    """Arguments of :func:`ttt.recipes.bench.bench`."""

    mixers: str = "ttt_linear,ttt_mlp,gated_deltanet,attention"
    """comma-separated mixers to compare (attention is the baseline)"""
    dim: int = 128
    """model width C of the benchmarked layer"""
    heads: int = 4
    """heads"""
    batch_size: int = 1
    """batch size"""
    lengths: str = "256,512,1024,2048"
    """comma-separated context lengths"""
    repeats: int = 3
    """timed repetitions (after one warm-up); the median is reported"""
    out: str = "bench"
    """directory for bench.md and bench.png"""
    device: str = "auto"
    """'auto', 'cpu', 'cuda', ..."""
    threads: int | None = None
    """torch CPU threads (default: torch's choice)"""


@cache
def field_docs(cls: type) -> dict[str, str]:
    """``{field: docstring}`` read from the attribute docstrings of a dataclass's source."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
        ):
            docs[node.target.id] = str(nxt.value.value)
    missing = {f.name for f in dataclasses.fields(cls)} - set(docs)
    if missing:
        raise RuntimeError(f"{cls.__name__}: fields without a docstring: {sorted(missing)}")
    return docs
