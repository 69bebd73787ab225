"""``ttt.attention``: the SDPA drop-in, its two limits (delta rule, linear attention) and its state."""

import pytest
import torch

import ttt
from ttt.testing import max_abs_diff


def qkv(B=2, H=3, T=21, Dk=5, Dv=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, H, T, Dk, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(B, H, T, Dv, generator=g, dtype=torch.float64)
    return q, k, v, torch.rand(B, H, T, generator=g, dtype=torch.float64) * 0.5


@pytest.mark.parametrize("b", [1, 4, 21])
@pytest.mark.parametrize("causal", [True, False])
def test_chunk_matches_autograd_reference(b, causal):
    q, k, v, lr = qkv()
    a = ttt.attention(q, k, v, lr=lr, mini_batch_size=b, is_causal=causal)
    r = ttt.attention(q, k, v, lr=lr, mini_batch_size=b, is_causal=causal, impl="reference")
    assert max_abs_diff(a, r) < 1e-10


def test_mini_batch_one_is_the_delta_rule():
    q, k, v, beta = qkv()
    S = torch.zeros(2, 3, 5, 6, dtype=torch.float64)
    outs = []
    for t in range(q.shape[2]):
        k_t, v_t = k[:, :, t], v[:, :, t]
        err = torch.einsum("bhk,bhkv->bhv", k_t, S) - v_t
        S = S - beta[:, :, t, None, None] * torch.einsum("bhk,bhv->bhkv", k_t, err)
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, :, t] * 5**-0.5, S))
    assert max_abs_diff(ttt.attention(q, k, v, lr=beta), torch.stack(outs, 2)) < 1e-12


@pytest.mark.parametrize("causal", [True, False])
def test_whole_sequence_mini_batch_is_linear_attention(causal):
    q, k, v, lr = qkv()
    scores = (q @ k.transpose(-1, -2)) * 5**-0.5 * lr[:, :, None, :]
    if causal:
        scores = scores.tril()
    assert (
        max_abs_diff(ttt.attention(q, k, v, lr=lr, mini_batch_size=21, is_causal=causal), scores @ v) < 1e-12
    )


def test_state_split_and_dtype():
    q, k, v, lr = qkv()
    whole = ttt.attention(q, k, v, lr=lr, mini_batch_size=4)
    a = ttt.attention(
        q[:, :, :6], k[:, :, :6], v[:, :, :6], lr=lr[:, :, :6], mini_batch_size=4, output_final_state=True
    )
    b = ttt.attention(q[:, :, 6:], k[:, :, 6:], v[:, :, 6:], lr=lr[:, :, 6:], mini_batch_size=4,
                      initial_state=a.final_state)  # fmt: skip
    assert max_abs_diff(torch.cat([a.output, b], 2), whole) < 1e-12
    out = ttt.attention(q.float(), k.float(), v.float(), lr=0.3)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 21, 6)


def test_same_call_as_sdpa():
    """The SDPA call works as is (q, k, v [B, H, T, D], the output [B, H, T, Dv] in q's dtype), and like
    causal SDPA the output at t depends on tokens <= t only (a change at t = 11 moves nothing before it)."""
    q, k, v, _ = qkv(Dv=5)
    o = ttt.attention(q, k, v, lr=0.1)
    assert o.shape == torch.nn.functional.scaled_dot_product_attention(q, k, v).shape
    assert o.dtype == q.dtype
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 11], v2[:, :, 11] = 1.0, -1.0
    o2 = ttt.attention(q, k2, v2, lr=0.1)
    assert torch.equal(o2[:, :, :11], o[:, :, :11])
    assert max_abs_diff(o2[:, :, 11:], o[:, :, 11:]) > 1e-3
    with pytest.raises(ValueError, match="inner_model must be 'linear'"):
        ttt.attention(q, k, v, lr=0.1, inner_model="mlp")


@pytest.mark.parametrize("b", [1, 4])
def test_gradients_match_reference(b):
    q, k, v, lr = (t.requires_grad_() for t in qkv(T=9))
    S0 = (torch.randn(1, 3, 5, 6, dtype=torch.float64) * 0.2).requires_grad_()
    leaves = (q, k, v, lr, S0)

    def grads(impl):
        out = ttt.attention(
            q, k, v, lr=lr, mini_batch_size=b, initial_state=S0, impl=impl, output_final_state=True
        )
        objective = (out.output * torch.cos(out.output)).sum() + out.final_state.weights[0].pow(2).sum()
        return torch.autograd.grad(objective, leaves)

    for got, want in zip(grads("chunk"), grads("reference")):
        assert max_abs_diff(got, want) < 1e-10


@pytest.mark.parametrize("b,impl", [(1, "chunk"), (4, "chunk"), (4, "reference")])
def test_bad_initial_state_is_rejected_in_every_form(b, impl):
    q, k, v, lr = qkv()
    with pytest.raises(ValueError, match=r"initial_state S must have shape \[3, 5, 6\]"):
        ttt.attention(q, k, v, lr=lr, mini_batch_size=b, impl=impl, initial_state=torch.zeros(1, 3, 6, 5))
