"""The bidirectional wrapper: the gated two-pass formula, real-token reversal under padding, sharing."""

from __future__ import annotations

import pytest
import torch

from ttt.layers import Attention, Bidirectional, TTTLinear
from ttt.layers.bidirectional import reverse_real_tokens
from ttt.testing import assert_padded_matches_rows


def _x(batch: int, length: int, dim: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, length, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_reverse_real_tokens_keeps_padding_in_place_and_is_an_involution():
    x = torch.arange(10.0).view(2, 5, 1)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    rev = reverse_real_tokens(x, mask)
    assert rev[:, :, 0].tolist() == [[4, 3, 2, 1, 0], [7, 6, 5, 8, 9]]
    torch.testing.assert_close(reverse_real_tokens(rev, mask), x)


@torch.no_grad()
def test_matches_the_two_pass_gated_formula():
    torch.manual_seed(0)
    mixer = TTTLinear(dim=16, num_heads=2, mini_batch_size=4).double()
    layer = Bidirectional(mixer).double()
    with torch.no_grad():
        layer.gate_forward.uniform_(-1, 1)
        layer.gate_backward.uniform_(-1, 1)
    x = _x(2, 11)
    h = x + torch.tanh(layer.gate_forward) * mixer(x)[0]
    h = h + torch.tanh(layer.gate_backward) * mixer(h.flip(1))[0].flip(1)
    torch.testing.assert_close(layer(x)[0], h - x, atol=1e-12, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("inner", ["ttt_linear", "attention"])
def test_padded_batch_matches_unpadded_sequences(inner):
    torch.manual_seed(0)
    layer = Bidirectional.from_name(inner, dim=16, num_heads=2, shared=False).double()
    lengths = [13, 5, 9]
    x = _x(3, 13)
    mask = torch.arange(13)[None, :] < torch.tensor(lengths)[:, None]
    y, state = layer(torch.where(mask[..., None], x, torch.full_like(x, 50.0)), mask=mask)
    assert state is None
    for row, n in enumerate(lengths):
        torch.testing.assert_close(y[row : row + 1, :n], layer(x[row : row + 1, :n])[0], atol=1e-10, rtol=0)


@pytest.mark.parametrize("inner", ["ttt_linear", "ttt_mlp"])
def test_non_causal_ttt_padded_batch_matches_unpadded_sequences(inner):
    """Non-causal TTT inside, real lengths not multiples of b = 16: forward and all gradients per row."""
    torch.manual_seed(0)
    layer = Bidirectional.from_name(inner, dim=16, num_heads=2, shared=False, causal=False).double()
    assert_padded_matches_rows(layer, _x(4, 45), [45, 37, 20, 5])


def test_gates_start_at_tanh_point_one_and_sees_the_future():
    torch.manual_seed(0)
    layer = Bidirectional(Attention(dim=16, num_heads=2))
    assert torch.allclose(torch.tanh(layer.gate_forward), torch.tanh(torch.tensor(0.1)))
    assert layer.backward_mixer is layer.forward_mixer
    x = torch.randn(1, 6, 16)
    x2 = x.clone()
    x2[:, -1] += 1.0
    assert not torch.allclose(layer(x)[0][:, 0], layer(x2)[0][:, 0])


def test_separate_parameters_and_errors():
    layer = Bidirectional(Attention(dim=16, num_heads=2), shared=False)
    assert layer.backward_mixer is not layer.forward_mixer
    layer(torch.randn(2, 4, 16))[0].sum().backward()
    assert layer.backward_mixer.q_proj.weight.grad is not None and layer.gate_backward.grad is not None
    with pytest.raises(RuntimeError, match="cannot decode"):
        layer.step(torch.randn(1, 1, 16), None)
    with pytest.raises(ValueError, match="no state"):
        layer(torch.randn(1, 4, 16), state=object())
    with pytest.raises(ValueError, match="unknown mixer"):
        Bidirectional.from_name("nope", dim=16, num_heads=2)
    with pytest.raises(TypeError, match=r"\.dim"):
        Bidirectional(torch.nn.Linear(3, 3))


@torch.no_grad()
def test_non_causal_ttt_inside_encoder():
    torch.manual_seed(0)
    layer = Bidirectional.from_name("ttt_mlp", dim=16, num_heads=2, mini_batch_size=4, causal=False).double()
    y, _ = layer(_x(2, 8))
    assert y.shape == (2, 8, 16) and torch.isfinite(y).all()
