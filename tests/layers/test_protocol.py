"""Invariances every mixer must satisfy (float64): step == forward, split == whole, padding, batch."""

from __future__ import annotations

import pytest
import torch

from ttt.layers import Mixer

from .mixer_cases import CASES, DIM, EXACT_AFTER_PADDING, make

ATOL = 1e-10


def _x(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, length, DIM, generator=gen, dtype=torch.float64)


@pytest.fixture(params=sorted(CASES))
def case(request) -> str:
    return request.param


@torch.no_grad()
def test_step_loop_equals_forward(case):
    layer = make(case)
    assert isinstance(layer, Mixer)
    x = _x(2, 21)
    y, _ = layer(x)
    state = layer.init_state(2, dtype=torch.float64)
    outs = []
    for t in range(x.shape[1]):
        y_t, state = layer.step(x[:, t : t + 1], state)
        outs.append(y_t)
    torch.testing.assert_close(torch.cat(outs, dim=1), y, atol=ATOL, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("split", [1, 7, 16])
def test_split_with_state_equals_whole(case, split):
    layer = make(case)
    x = _x(2, 27)
    y, _ = layer(x)
    y1, state = layer(x[:, :split])
    y2, state = layer(x[:, split:], state)
    torch.testing.assert_close(torch.cat([y1, y2], dim=1), y, atol=ATOL, rtol=0)


@torch.no_grad()
def test_init_state_equals_no_state(case):
    layer = make(case)
    x = _x(2, 9)
    torch.testing.assert_close(
        layer(x, layer.init_state(2, dtype=torch.float64))[0], layer(x)[0], atol=ATOL, rtol=0
    )


@torch.no_grad()
def test_padded_batch_matches_unpadded_sequences(case):
    layer = make(case)
    lengths = [37, 11, 20]
    x = _x(3, 37)
    mask = torch.arange(37)[None, :] < torch.tensor(lengths)[:, None]
    # garbage in the padded slots must not leak into the real positions
    x_padded = torch.where(mask[..., None], x, torch.full_like(x, 1e3))
    y, _ = layer(x_padded, mask=mask)
    assert torch.isfinite(y).all()
    for row, n in enumerate(lengths):
        y_row, _ = layer(x[row : row + 1, :n])
        torch.testing.assert_close(y[row : row + 1, :n], y_row, atol=ATOL, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("case", sorted(EXACT_AFTER_PADDING))
def test_padded_prefill_then_decode_matches_unpadded(case):
    layer = make(case)
    lengths = [13, 6]
    x = _x(2, 13)
    tail = _x(2, 4, seed=2)
    mask = torch.arange(13)[None, :] < torch.tensor(lengths)[:, None]
    _, state = layer(x, mask=mask)
    outs = []
    for t in range(4):
        y_t, state = layer.step(tail[:, t : t + 1], state)
        outs.append(y_t)
    got = torch.cat(outs, dim=1)
    for row, n in enumerate(lengths):
        seq = torch.cat([x[row : row + 1, :n], tail[row : row + 1]], dim=1)
        want, _ = layer(seq)
        torch.testing.assert_close(got[row : row + 1], want[:, n:], atol=ATOL, rtol=0)


@torch.no_grad()
def test_batch_invariance(case):
    layer = make(case)
    x = _x(4, 19)
    y, _ = layer(x)
    for row in range(4):
        torch.testing.assert_close(layer(x[row : row + 1])[0], y[row : row + 1], atol=ATOL, rtol=0)


def test_backward_reaches_every_parameter(case):
    layer = make(case)
    y, _ = layer(_x(2, 18))
    y.square().sum().backward()
    missing = [n for n, p in layer.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"no finite gradient for {missing}"


def test_bad_input_raises(case):
    layer = make(case)
    with pytest.raises(ValueError, match=r"\[B, T, 24\]"):
        layer(torch.zeros(2, 5, DIM + 1, dtype=torch.float64))
    with pytest.raises(TypeError, match="floating"):
        layer(torch.zeros(2, 5, DIM, dtype=torch.long))
    with pytest.raises(ValueError, match="right padding"):
        layer(_x(1, 4), mask=torch.tensor([[True, False, True, True]]))
    with pytest.raises(ValueError, match=r"mask must be \[B, T\]"):
        layer(_x(1, 4), mask=torch.ones(1, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\[B, 1, 24\]"):
        layer.step(_x(1, 2), layer.init_state(1, dtype=torch.float64))


@torch.no_grad()
@pytest.mark.parametrize("case", sorted(EXACT_AFTER_PADDING))
def test_padded_chunks_continue_like_the_unpadded_sequences(case):
    """Two right-padded chunks in a row: each row's real tokens, concatenated, give the unpadded outputs."""
    layer = make(case)
    first, second = [9, 4], [3, 6]
    x1, x2 = _x(2, 9), _x(2, 6, seed=2)
    mask1 = torch.arange(9)[None, :] < torch.tensor(first)[:, None]
    mask2 = torch.arange(6)[None, :] < torch.tensor(second)[:, None]
    y1, state = layer(x1, mask=mask1)
    y2, _ = layer(x2, state, mask=mask2)
    for row in range(2):
        a, b = first[row], second[row]
        want, _ = layer(torch.cat([x1[row : row + 1, :a], x2[row : row + 1, :b]], dim=1))
        torch.testing.assert_close(y1[row : row + 1, :a], want[:, :a], atol=ATOL, rtol=0)
        torch.testing.assert_close(y2[row : row + 1, :b], want[:, a:], atol=ATOL, rtol=0)
