"""Multi-query associative recall (MQAR; Arora et al. 2023, "Zoology", arXiv 2312.04927).

Each example lists D key-value pairs, then asks for the values of all D keys again, in a random order
and at random distances. A mixer solves it only if its state can hold D bindings at once, which is
what separates attention, linear attention, the delta rule and TTT at small widths.

The procedure follows the Zoology generator (``zoology/data/multiquery_ar.py``), re-implemented here:

1. token 0 is the blank; keys come from ``[1, V/2)``, values from ``[V/2, V)``;
2. every example draws D distinct keys and D distinct values;
3. the context is ``k1 v1 k2 v2 ... kD vD`` (length 2D), repeated ``num_passes`` times (length C);
4. the rest, ``T - C + 1`` blanks, is seen as ``S = (T - C) / 2`` two-token slots; slot i = 1..S has
   probability proportional to ``a * i^(a - 1)`` (``a = power_a``; 0.01 favours short key-query gaps);
5. D distinct slots are drawn with these probabilities and key j goes to the first token of slot g_j;
6. the label of value j sits one position later; inputs = ``seq[:T]``, labels = ``labels[1:]``, so the
   label is on the query key's position and the value is never an input after the context;
7. with ``random_non_queries`` every blank input becomes a uniform random token of ``[0, V)``.

Shapes: N examples, T tokens, D key-value pairs, V vocabulary.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["IGNORE_INDEX", "make_mqar", "mqar_slot_probabilities"]

#: label of positions that carry no target (``torch.nn.functional.cross_entropy``'s default ignore_index)
IGNORE_INDEX = -100

# rows drawn at once when sampling without replacement: bounds the [rows, population] scores to ~16 MB
_SCORES_PER_CHUNK = 1 << 22


def make_mqar(
    num_examples: int,
    *,
    seq_len: int,
    num_kv_pairs: int,
    vocab_size: int,
    power_a: float = 0.01,
    num_passes: int = 1,
    random_non_queries: bool = True,
    seed: int | torch.Generator = 0,
) -> tuple[Tensor, Tensor]:
    """Draw ``num_examples`` MQAR examples, vectorised over examples.

    Args:
        num_examples: N, the number of examples.
        seq_len: T, the input length; even.
        num_kv_pairs: D, key-value pairs per example (and queries per example).
        vocab_size: V; must exceed T. Keys are ``[1, V/2)``, values ``[V/2, V)``.
        power_a: a of the slot distribution ``a * i^(a - 1)``. Default: ``0.01``.
        num_passes: times the context is repeated before the queries. Default: ``1``.
        random_non_queries: replace every blank input with a random token of ``[0, V)``. Default: ``True``.
        seed: an int seeds a fresh ``torch.Generator``; a generator is used (and advanced) as is.
            Default: ``0``.

    Returns:
        ``(inputs [N, T], labels [N, T])``, both int64. ``labels`` is ``IGNORE_INDEX`` except at the D
        positions where a query key is the input; there it holds that key's value.

    Examples::

        >>> inputs, labels = make_mqar(2, seq_len=16, num_kv_pairs=2, vocab_size=32, seed=0)
        >>> inputs.shape, labels.shape, int((labels != IGNORE_INDEX).sum())
        (torch.Size([2, 16]), torch.Size([2, 16]), 4)
    """
    _check_arguments(num_examples, seq_len, num_kv_pairs, vocab_size, power_a, num_passes)
    g = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)
    n, d, half = num_examples, num_kv_pairs, vocab_size // 2
    keys = 1 + _draw_distinct_uniform(n, half - 1, d, g)  # [N, D]
    values = half + _draw_distinct_uniform(n, vocab_size - half, d, g)  # [N, D]
    context = torch.stack([keys, values], dim=-1).reshape(n, 2 * d).repeat(1, num_passes)  # [N, C]
    c = context.shape[1]

    num_slots = (seq_len - c) // 2
    slot_logp = mqar_slot_probabilities(num_slots, power_a).log().expand(n, num_slots)
    # slot g_j is 0-based: key j goes to index 2 * g_j of the query region, its label one later
    slots = _draw_distinct_weighted(slot_logp, d, g)  # [N, D]
    queries = torch.zeros(n, seq_len - c + 1, dtype=torch.long).scatter_(1, 2 * slots, keys)
    sequence = torch.cat([context, queries], dim=1)  # [N, T + 1]
    labels = torch.full_like(sequence, IGNORE_INDEX).scatter_(1, c + 2 * slots + 1, values)

    inputs, labels = sequence[:, :-1].contiguous(), labels[:, 1:].contiguous()  # [N, T] each
    if random_non_queries:
        noise = torch.randint(0, vocab_size, inputs.shape, generator=g)
        inputs = torch.where(inputs == 0, noise, inputs)
    return inputs, labels


def mqar_slot_probabilities(num_slots: int, power_a: float = 0.01) -> Tensor:
    """``[S]`` float64 probabilities of query slots 1..S, proportional to ``a * i^(a - 1)``."""
    i = torch.arange(1, num_slots + 1, dtype=torch.float64)
    weights = power_a * i ** (power_a - 1)
    return weights / weights.sum()


def _draw_distinct_uniform(num_rows: int, population: int, k: int, g: torch.Generator) -> Tensor:
    """``[N, k]`` distinct indices of ``[0, population)`` per row, a uniform random subset in random order.

    Floyd's algorithm costs O(N k^2) instead of the O(N population) of scoring every candidate, which
    matters at Zoology's V = 8192 (a [100k, 4096] score matrix takes seconds to fill).
    """
    picks = torch.zeros(num_rows, k, dtype=torch.long)
    for i, top in enumerate(range(population - k, population)):
        candidate = torch.randint(0, top + 1, (num_rows,), generator=g)
        taken = (picks[:, :i] == candidate[:, None]).any(dim=1)
        picks[:, i] = torch.where(taken, top, candidate)
    # Floyd's subset is uniform but its order is not (late picks are biased towards large indices)
    order = torch.rand(num_rows, k, generator=g).argsort(dim=1)
    return picks.gather(1, order)


def _draw_distinct_weighted(log_weights: Tensor, k: int, g: torch.Generator) -> Tensor:
    """``[N, k]`` indices drawn without replacement per row with probability ∝ ``exp(log_weights [N, P])``.

    Gumbel-top-k: the k largest of ``log w + Gumbel noise`` are distributed exactly as k sequential draws
    without replacement (``numpy.random.choice(..., replace=False, p=w)``), and come out in draw order.
    """
    n, population = log_weights.shape
    rows = max(1, _SCORES_PER_CHUNK // max(1, population))
    picks = []
    for start in range(0, n, rows):
        logw = log_weights[start : start + rows]
        uniform = torch.rand(logw.shape, generator=g, dtype=torch.float64).clamp_min(1e-300)
        picks.append((logw - (-uniform.log()).log()).topk(k, dim=1).indices)
    return torch.cat(picks) if picks else torch.zeros(0, k, dtype=torch.long)


def _check_arguments(
    num_examples: int, seq_len: int, num_kv_pairs: int, vocab_size: int, power_a: float, num_passes: int
) -> None:
    if num_examples < 0:
        raise ValueError(f"num_examples must be >= 0, got {num_examples}")
    if num_kv_pairs < 1 or num_passes < 1:
        raise ValueError(f"num_kv_pairs and num_passes must be >= 1, got {num_kv_pairs} and {num_passes}")
    if seq_len % 2:
        raise ValueError(f"seq_len must be even (queries fill two-token slots), got {seq_len}")
    if vocab_size <= seq_len:
        raise ValueError(
            f"vocab_size must be larger than seq_len, got vocab_size={vocab_size}, seq_len={seq_len}"
        )
    if 2 * num_kv_pairs * num_passes + 2 * num_kv_pairs > seq_len:
        raise ValueError(
            f"2 * num_kv_pairs * num_passes + 2 * num_kv_pairs must be <= seq_len (context plus one slot per "
            f"query), got 2*{num_kv_pairs}*{num_passes} + 2*{num_kv_pairs} > {seq_len}"
        )
    if power_a <= 0:
        raise ValueError(f"power_a must be > 0, got {power_a}")
