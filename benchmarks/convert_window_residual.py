"""What does a sliding window (with attention sinks) miss of a pretrained model's attention, and could a
mixer added beside it supply that? Per block of the teacher, on one training batch, per head before o_proj.

    python benchmarks/convert_window_residual.py --blocks 8 --windows 64,16 --sink 4 \
        --out benchmarks/results/convert_window_residual

With Z = Z_w + Z_f the softmax normaliser split into the keys inside the window (and the sinks) and the
keys beyond it, full attention is ``a = (1 - lam) a_w + lam a_f`` with ``lam = Z_f / Z``, so the residual
a ``windowed`` block's mixer is trained on (``ttt convert --transfer-target residual``) is

    r = a - a_w = lam (a_f - a_w)

It carries the window's own output ``a_w``, which a mixer added beside the window never sees. Columns:

- ``|r|^2 / |a|^2``: the residual's share of the attention output's energy (queries with keys beyond the
  window only);
- ``c * a_w`` (upper bound): the share of ``|r|^2`` that the window's own output explains, scaled by the
  best scalar per token and head (a gate on the window that knew ``r`` could do this well);
- ``LSE gate``: the share explained by ``-sigmoid(beta_h + log n_far - LSE_w) a_w``, a gate from the
  window's own log-normaliser ``LSE_w`` and the number of keys beyond it, with the best constant beta
  per head on a grid (and the next column's beta) (``lam`` exactly if the keys beyond the window all
  scored ``beta_h``);
- ``mass gate``: the same gate with ``beta_h`` the mean of ``lse_f - log n_far`` over the batch (the
  teacher's log-mass per far key: how ``ttt convert --far-gate mass`` starts it); negative when it fits worse
  than no gate;
- ``lam a_f``: the energy of the part only a memory of the far keys can supply, relative to ``|r|^2``
  (what a mixer beside a window with an exact gate would have to supply).

Independent of the library's attention: scores, masks and softmax are computed here in float64 from the
teacher's projections (tests/benchmarks/test_convert_window_residual.py checks them against it).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
from torch import Tensor, nn

from ttt.recipes.args import Parser, positive_int


@torch.no_grad()
def attention_parts(mixer: nn.Module, h: Tensor, window: int, sink: int) -> dict[str, Tensor]:
    """Full and windowed softmax attention of ``mixer`` (a :class:`~ttt.layers.SoftmaxAttention`) on its
    input ``h [B, T, C]``, per head, float64: ``a``, ``a_w``, ``a_f`` ``[B, H, T, D]`` (``a_f`` 0 where a
    query has no key beyond the window), ``lse_w``, ``lse_f`` ``[B, H, T]`` and ``far`` ``[T, T]`` (keys
    beyond the window and the first ``sink`` tokens)."""
    from ttt.layers.attention import apply_rotary, rotary_cos_sin, split_heads

    if mixer.q_proj.bias is not None or getattr(mixer, "conv_size", 0):
        raise ValueError("attention_parts: expected attention without biases or short convolutions (Llama's)")
    h = h.double()
    w = {n: p.double() for n, p in mixer.named_parameters()}
    q = split_heads(h @ w["q_proj.weight"].T, mixer.num_heads)
    k = split_heads(h @ w["k_proj.weight"].T, mixer.num_kv_heads)
    v = split_heads(h @ w["v_proj.weight"].T, mixer.num_kv_heads)
    steps = torch.arange(h.shape[1])
    cos, sin = rotary_cos_sin(steps, mixer.head_dim, theta=mixer.rope_theta)
    q, k = apply_rotary(q, cos.double(), sin.double()), apply_rotary(k, cos.double(), sin.double())
    repeats = mixer.num_heads // mixer.num_kv_heads
    k, v = k.repeat_interleave(repeats, 1), v.repeat_interleave(repeats, 1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(mixer.head_dim)  # [B, H, T, T]
    qp, kp = steps[:, None], steps[None, :]
    causal = kp <= qp
    near = causal & ((qp - kp < window) | (kp < sink))
    far = causal & ~near

    def part(mask: Tensor) -> tuple[Tensor, Tensor]:
        masked = scores.masked_fill(~mask, -math.inf)
        lse = torch.logsumexp(masked, -1)
        probs = torch.exp(masked - lse[..., None]).nan_to_num(0.0)  # a row without keys: zeros
        return probs @ v, lse

    a, _ = part(causal)
    a_w, lse_w = part(near)
    a_f, lse_f = part(far)
    return {"a": a, "a_w": a_w, "a_f": a_f, "lse_w": lse_w, "lse_f": lse_f, "far": far}


def residual_stats(parts: dict[str, Tensor], betas: Tensor | None = None) -> dict[str, float]:
    """The columns of the module docstring, over the queries that have keys beyond the window."""
    has = parts["far"].any(-1)
    a, a_w, a_f = (parts[n][:, :, has] for n in ("a", "a_w", "a_f"))
    lse_w, lse_f = parts["lse_w"][:, :, has], parts["lse_f"][:, :, has]
    r = a - a_w
    total = float(r.pow(2).sum())
    c = (r * a_w).sum(-1, keepdim=True) / a_w.pow(2).sum(-1, keepdim=True).clamp_min(1e-300)
    lam = torch.sigmoid(lse_f - lse_w)[..., None]
    log_far = parts["far"].sum(-1)[has].double().log()
    betas = torch.linspace(-20, 10, 121, dtype=torch.float64) if betas is None else betas
    mass_betas = (lse_f - log_far).mean(dim=(0, 2))  # [H]: fit_far_gates(fit="mass")'s start

    def gated(head: int, beta: float) -> float:
        rh, wh, lh = r[:, head], a_w[:, head], lse_w[:, head]
        return float((rh + torch.sigmoid(beta + log_far - lh)[..., None] * wh).pow(2).sum())

    mass_fits = [gated(head, float(mass_betas[head])) for head in range(r.shape[1])]
    best = sum(min(fit, *(gated(head, float(b)) for b in betas)) for head, fit in enumerate(mass_fits))
    mass = sum(mass_fits)
    return {
        "residual_share": float(r.pow(2).sum() / a.pow(2).sum()),
        "scaled_window": 1 - float((r - c * a_w).pow(2).sum()) / total,
        "lse_gate": 1 - best / total,
        "mass_gate": 1 - mass / total,
        "far_part": float((lam * a_f).pow(2).sum()) / total,
    }


def probe(teacher: nn.Module, x: Tensor, windows: list[int], sink: int) -> list[dict]:
    """``[{"window", "block", **residual_stats}]`` for every block of ``teacher`` on the batch ``x``."""
    from ttt.recipes.convert import capture_attention

    blocks = list(range(len(teacher.blocks)))
    inputs = {i: h for i, (h, _) in capture_attention(teacher, blocks, x).items()}
    rows = []
    for window in windows:
        for i, block in enumerate(teacher.blocks):
            stats = residual_stats(attention_parts(block.mixer, inputs[i], window, sink))
            rows.append({"window": window, "block": i, **stats})
    return rows


def main(argv: list[str] | None = None) -> None:
    from ttt.data import load_corpus, prepare, sample_batch
    from ttt.recipes.convert import load_teacher, truncate_blocks
    from ttt.recipes.evidence.common import width_list

    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default="smollm2", help="as ttt convert --teacher (default: smollm2)")
    p.add_argument("--blocks", type=positive_int, default=8, help="the teacher's first N blocks (default: 8)")
    p.add_argument(
        "--windows", type=width_list, default=[64, 16], help="comma-separated windows W (default: 64,16)"
    )
    p.add_argument("--sink", type=int, default=4, help="attention sinks beside every window (default: 4)")
    p.add_argument("--corpus", default="shakespeare", help="training text (its train split)")
    p.add_argument("--context", type=positive_int, default=256)
    p.add_argument("--batch-size", type=positive_int, default=4)
    p.add_argument("--seed", type=int, default=2, help="batch seed (2: ttt convert's calibration batch)")
    p.add_argument("--threads", type=positive_int, default=1)
    p.add_argument("--out", type=Path, help="write OUT.md and OUT.json (default: print only)")
    a = p.parse(argv)
    windows = a.windows
    if a.sink < 0:
        p.error(f"--sink must be >= 0, got {a.sink}")
    if a.context <= max(windows) + a.sink:
        p.error(f"--context {a.context}: no query would have keys beyond a window + sinks (expected more "
                f"than {max(windows) + a.sink} tokens)")  # fmt: skip
    if a.out is not None and not a.out.parent.is_dir():
        p.error(f"--out {a.out}: no directory {a.out.parent}")
    torch.set_num_threads(a.threads)
    try:  # an unreadable teacher or corpus: one line, not a traceback
        teacher, tokenizer = load_teacher(a.teacher)
        truncate_blocks(teacher, min(a.blocks, len(teacher.blocks)))
        data = prepare(load_corpus(a.corpus), tokenizer)
    except (OSError, ValueError) as e:
        p.error(str(e))
    x, _ = sample_batch(data.train, a.batch_size, a.context, torch.Generator().manual_seed(a.seed))
    rows = probe(teacher, x, windows, a.sink)
    lines = [
        f"Residual of a window + {a.sink} sinks against full attention, teacher `{a.teacher}`, one training "
        f"batch of {a.batch_size} x {a.context} tokens of {a.corpus}; per head before o_proj "
        "(columns: the script's docstring).",
        "",
        "| window | block | \\|r\\|^2 / \\|a\\|^2 | c * a_w (upper bound) | LSE gate | mass gate | lam a_f |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['window']} | {r['block']} | {r['residual_share']:.3f} | {r['scaled_window']:.2f} | "
        f"{r['lse_gate']:.2f} | {r['mass_gate']:.2f} | {r['far_part']:.2f} |"
        for r in rows
    ]
    command = " ".join(argv if argv is not None else sys.argv[1:])
    md = "\n".join(lines) + f"\n\nCommand: `python benchmarks/convert_window_residual.py {command}`\n"
    print(md)
    if a.out:
        from ttt.models.checkpoint import write_text_atomic

        write_text_atomic(a.out.with_suffix(".md"), md)
        write_text_atomic(a.out.with_suffix(".json"), json.dumps({"rows": rows}, indent=1))


if __name__ == "__main__":
    main()
