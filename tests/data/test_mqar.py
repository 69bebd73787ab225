"""The MQAR generator: layout of context and queries, labels, distinctness, seeding, preconditions."""

from __future__ import annotations

import doctest

import pytest
import torch

import ttt.data.mqar
from ttt.data import make_mqar
from ttt.data.mqar import IGNORE_INDEX, mqar_slot_probabilities

V = 64


def clean(n=32, seq_len=30, num_kv_pairs=5, num_passes=1, seed=0):
    """Examples without random non-queries, so every blank input is still 0."""
    return make_mqar(n, seq_len=seq_len, num_kv_pairs=num_kv_pairs, vocab_size=V, num_passes=num_passes,
                     random_non_queries=False, seed=seed)  # fmt: skip


@pytest.mark.parametrize("random_non_queries", [False, True], ids=["blanks", "random-non-queries"])
def test_shape_and_dtype(random_non_queries):
    inputs, labels = make_mqar(
        7, seq_len=30, num_kv_pairs=5, vocab_size=V, random_non_queries=random_non_queries
    )
    assert inputs.shape == labels.shape == (7, 30)
    assert inputs.dtype == labels.dtype == torch.int64
    assert inputs.min() >= 0 and inputs.max() < V
    assert ((labels != IGNORE_INDEX).sum(1) == 5).all()


@pytest.mark.parametrize("num_passes", [1, 2])
def test_labels_sit_on_query_keys_and_hold_their_values(num_passes):
    d = 4
    inputs, labels = clean(seq_len=40, num_kv_pairs=d, num_passes=num_passes)
    context = 2 * d * num_passes
    for x, y in zip(inputs, labels):
        keys, values = x[0 : 2 * d : 2], x[1 : 2 * d : 2]
        assert torch.equal(
            x[:context], torch.cat([keys, values], dim=0).view(2, d).T.reshape(-1).repeat(num_passes)
        )
        positions = (y != IGNORE_INDEX).nonzero().flatten()
        # every query key appears exactly once after the context, each on a slot's first token
        assert (positions >= context).all() and ((positions - context) % 2 == 0).all()
        assert sorted(x[positions].tolist()) == sorted(keys.tolist())
        binding = dict(zip(keys.tolist(), values.tolist()))
        assert [binding[k] for k in x[positions].tolist()] == y[positions].tolist()


def test_values_are_never_inputs_after_the_context():
    d = 5
    inputs, _ = clean(n=64, num_kv_pairs=d)
    queries = inputs[:, 2 * d :]
    assert ((queries == 0) | ((queries >= 1) & (queries < V // 2))).all()
    # and no query key is followed by anything but a blank
    assert (queries[:, 1::2] == 0).all()


def test_random_non_queries_replace_only_blanks():
    blanks, labels = clean(seed=3)
    noisy, noisy_labels = make_mqar(32, seq_len=30, num_kv_pairs=5, vocab_size=V, seed=3)
    kept = blanks != 0
    assert torch.equal(noisy[kept], blanks[kept]) and torch.equal(noisy_labels, labels)
    # the blanks did get replaced (a few may draw 0 again)
    assert (noisy[~kept] != 0).float().mean() > 0.9


def test_keys_and_values_are_distinct_and_in_their_ranges():
    d = 12
    inputs, _ = make_mqar(200, seq_len=62, num_kv_pairs=d, vocab_size=V, seed=1)
    keys, values = inputs[:, 0 : 2 * d : 2], inputs[:, 1 : 2 * d : 2]
    assert ((keys >= 1) & (keys < V // 2)).all() and ((values >= V // 2) & (values < V)).all()
    for row in (keys, values):
        assert (row.sort(1).values.diff(dim=1) > 0).all()


def test_a_seed_fixes_the_examples():
    a, b, c = (make_mqar(16, seq_len=32, num_kv_pairs=4, vocab_size=V, seed=s) for s in (5, 5, 6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    assert torch.equal(make_mqar(4, seq_len=32, num_kv_pairs=4, vocab_size=V, seed=g1)[0],
                       make_mqar(4, seq_len=32, num_kv_pairs=4, vocab_size=V, seed=g2)[0])  # fmt: skip


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(seq_len=31), "even"),
        (dict(vocab_size=32), "larger than seq_len"),
        (dict(num_kv_pairs=9), "<= seq_len"),
        (dict(num_kv_pairs=6, num_passes=2), "<= seq_len"),
        (dict(num_kv_pairs=0), ">= 1"),
        (dict(power_a=0.0), "power_a"),
    ],
    ids=["odd-T", "V-not-above-T", "too-many-pairs", "too-many-passes", "no-pairs", "power-a-zero"],
)
def test_bad_arguments_raise(kwargs, message):
    args = dict(seq_len=32, num_kv_pairs=4, vocab_size=64) | kwargs
    with pytest.raises(ValueError, match=message):
        make_mqar(2, **args)


def test_slots_follow_the_power_law():
    # 20,000 examples, D = 1: the slot of the single query; 29 slots of which slot 1 has probability ~0.27
    d, seq_len = 1, 60
    _, labels = make_mqar(20_000, seq_len=seq_len, num_kv_pairs=d, vocab_size=V, seed=0)
    slot = ((labels != IGNORE_INDEX).nonzero()[:, 1] - 2 * d) // 2
    counts = torch.bincount(slot, minlength=29).double()
    expected = mqar_slot_probabilities(29) * len(slot)
    assert counts[:5].sum() > 2 * counts[-5:].sum()
    # within 5 binomial standard deviations of a * i^(a - 1), slot by slot
    sigma = (expected * (1 - expected / len(slot))).sqrt()
    assert ((counts - expected).abs() < 5 * sigma + 1).all()


def test_several_queries_favour_early_slots():
    _, labels = make_mqar(4000, seq_len=62, num_kv_pairs=4, vocab_size=V, seed=2)
    slot = ((labels != IGNORE_INDEX).nonzero()[:, 1] - 8) // 2  # 27 slots
    counts = torch.bincount(slot, minlength=27)
    assert counts[:7].sum() > 1.5 * counts[-7:].sum()


def test_keys_are_uniform_in_every_context_position():
    # Floyd's sampler picks a uniform subset; the shuffle after it must make each position uniform too
    d, n = 4, 20_000
    inputs, _ = make_mqar(n, seq_len=32, num_kv_pairs=d, vocab_size=V, seed=4)
    for j in (0, d - 1):
        counts = torch.bincount(inputs[:, 2 * j], minlength=V // 2)[1:].double()
        expected = n / (V // 2 - 1)
        assert ((counts - expected).abs() < 5 * expected**0.5).all()


def test_docstring_example_runs():
    result = doctest.testmod(ttt.data.mqar, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
