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


@pytest.mark.parametrize(
    "b,causal", [(1, True), (4, True), (21, True), (4, False), (21, False), (None, False)]
)
@pytest.mark.parametrize("normalize", [True, False])
def test_chunk_matches_autograd_reference(b, causal, normalize):
    q, k, v, lr = qkv()
    kw = dict(lr=lr, mini_batch_size=b, is_causal=causal, normalize=normalize)
    a = ttt.attention(q, k, v, **kw)
    r = ttt.attention(q, k, v, **kw, impl="reference")
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
    got = ttt.attention(q, k, v, lr=beta, is_causal=True, normalize=False)
    assert max_abs_diff(got, torch.stack(outs, 2)) < 1e-12


@pytest.mark.parametrize("causal", [True, False])
def test_whole_sequence_mini_batch_is_linear_attention(causal):
    q, k, v, lr = qkv()
    scores = (q @ k.transpose(-1, -2)) * 5**-0.5 * lr[:, :, None, :]
    if causal:
        scores = scores.tril()
    got = ttt.attention(q, k, v, lr=lr, mini_batch_size=21, is_causal=causal, normalize=False)
    assert max_abs_diff(got, scores @ v) < 1e-12


def test_state_split_and_dtype():
    q, k, v, lr = qkv()
    whole = ttt.attention(q, k, v, lr=lr, mini_batch_size=4, is_causal=True)
    a = ttt.attention(q[:, :, :6], k[:, :, :6], v[:, :, :6], lr=lr[:, :, :6], mini_batch_size=4, is_causal=True,
                      output_final_state=True)  # fmt: skip
    b = ttt.attention(q[:, :, 6:], k[:, :, 6:], v[:, :, 6:], lr=lr[:, :, 6:], is_causal=True,
                      initial_state=a.final_state)  # fmt: skip
    assert max_abs_diff(torch.cat([a.output, b], 2), whole) < 1e-12
    out = ttt.attention(q.float(), k.float(), v.float(), lr=0.3)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 21, 6)


def test_same_call_as_sdpa():
    """The SDPA call works as is (q, k, v [B, H, T, D], the output [B, H, T, Dv] in q's dtype), and like
    causal SDPA, with is_causal=True the output at t depends on tokens <= t only (a change at t = 11 moves
    nothing before it)."""
    q, k, v, _ = qkv(Dv=5)
    o = ttt.attention(q, k, v, lr=0.1, is_causal=True)
    assert o.shape == torch.nn.functional.scaled_dot_product_attention(q, k, v).shape
    assert o.dtype == q.dtype
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 11], v2[:, :, 11] = 1.0, -1.0
    o2 = ttt.attention(q, k2, v2, lr=0.1, is_causal=True)
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
            q,
            k,
            v,
            lr=lr,
            mini_batch_size=b,
            initial_state=S0,
            impl=impl,
            output_final_state=True,
            is_causal=True,
        )
        objective = (out.output * torch.cos(out.output)).sum() + out.final_state.weights[0].pow(2).sum()
        return torch.autograd.grad(objective, leaves)

    for got, want in zip(grads("chunk"), grads("reference")):
        assert max_abs_diff(got, want) < 1e-10


@pytest.mark.parametrize("b,impl", [(1, "chunk"), (4, "chunk"), (4, "reference")])
def test_bad_initial_state_is_rejected_in_every_form(b, impl):
    q, k, v, lr = qkv()
    with pytest.raises(ValueError, match=r"initial_state S must have shape \[3, 5, 6\]"):
        ttt.attention(
            q,
            k,
            v,
            lr=lr,
            mini_batch_size=b,
            impl=impl,
            initial_state=torch.zeros(1, 3, 6, 5),
            is_causal=True,
        )


# --- the drop-in: SDPA's call, stable by default ---------------------------------------------------


def test_takes_sdpa_positional_arguments_and_defaults():
    """``(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa)`` in SDPA's order, SDPA's defaults."""
    import inspect

    params = list(inspect.signature(ttt.attention).parameters.values())[:8]
    assert [(p.name, p.default) for p in params[3:]] == [
        ("attn_mask", None), ("dropout_p", 0.0), ("is_causal", False), ("scale", None), ("enable_gqa", False),
    ]  # fmt: skip
    q, k, v, _ = qkv()
    torch.testing.assert_close(
        ttt.attention(q, k, v, None, 0.0, True, 0.3), ttt.attention(q, k, v, is_causal=True, scale=0.3)
    )


@pytest.mark.parametrize("T", [100, 10_000])
@pytest.mark.parametrize("kw", [{}, {"is_causal": True}, {"is_causal": True, "mini_batch_size": 16}])
def test_finite_by_default_on_randn(T, kw):
    """The unnormalised rule at lr = 0.5 reaches 1e34 by T = 100 and NaN by T = 200 on these inputs."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, T, 32, generator=g) for _ in range(3))
    assert torch.isfinite(ttt.attention(q, k, v, **kw)).all()


def test_unnormalised_rule_is_one_argument_away():
    q, k, v, lr = qkv()
    unit = torch.nn.functional.normalize(k, dim=-1)
    for b in (1, 4):
        a = ttt.attention(q, k, v, lr=lr, is_causal=True, mini_batch_size=b)
        r = ttt.attention(q, unit, v, lr=lr, is_causal=True, mini_batch_size=b, normalize=False)
        assert max_abs_diff(a, r) < 1e-12


def test_default_lr_and_noncausal_default():
    """lr defaults to 1 / mini_batch_size; the non-causal default reads the whole sequence: every query
    sees every key, o_i = scale * mean_j (q_i . k_j) v_j over unit keys."""
    q, k, v, _ = qkv()
    unit = torch.nn.functional.normalize(k, dim=-1)
    for b in (1, 4):
        want = ttt.attention(q, k, v, lr=1.0 / b, is_causal=True, mini_batch_size=b)
        assert max_abs_diff(ttt.attention(q, k, v, is_causal=True, mini_batch_size=b), want) < 1e-14
    scores = q @ unit.transpose(-1, -2) * 5**-0.5 / q.shape[2]
    assert max_abs_diff(ttt.attention(q, k, v), scores @ v) < 1e-12
    with pytest.raises(ValueError, match="is_causal=False with mini_batch_size=1 .* which is causal"):
        ttt.attention(q, k, v, mini_batch_size=1)


def test_dropout_is_refused():
    q, k, v, _ = qkv()
    with pytest.raises(ValueError, match="dropout_p must be 0"):
        ttt.attention(q, k, v, dropout_p=0.1)


@pytest.mark.parametrize("b,causal", [(None, True), (4, True), (None, False), (4, False)])
def test_key_padding_mask_gives_each_row_its_unpadded_outputs(b, causal):
    """A boolean key mask (True = the key takes part), right padding: real outputs equal the unpadded call's."""
    q, k, v, _ = qkv(B=2, T=11)
    n = 7  # row 1 holds 7 real tokens
    keys = torch.ones(2, 11, dtype=torch.bool)
    keys[1, n:] = False
    for mask in (keys[:, None, None, :], keys[:, None, None, :].expand(2, 1, 11, 11)):
        o = ttt.attention(q, k, v, mask, is_causal=causal, mini_batch_size=b)
        alone = ttt.attention(q[1:, :, :n], k[1:, :, :n], v[1:, :, :n], is_causal=causal, mini_batch_size=b)
        assert max_abs_diff(o[1:, :, :n], alone) < 1e-12
        assert (
            max_abs_diff(o[:1], ttt.attention(q[:1], k[:1], v[:1], is_causal=causal, mini_batch_size=b))
            < 1e-12
        )


def test_left_padding_and_the_causal_triangle_in_the_mask():
    """At mini-batch 1 any key padding is exact; a mask holding the causal triangle (as models build
    4-D masks) makes the call causal."""
    q, k, v, _ = qkv(B=2, T=9)
    keys = torch.ones(2, 9, dtype=torch.bool)
    keys[1, :3] = False  # left padding
    o = ttt.attention(q, k, v, keys[:, None, None, :], is_causal=True)
    alone = ttt.attention(q[1:, :, 3:], k[1:, :, 3:], v[1:, :, 3:], is_causal=True)
    assert max_abs_diff(o[1:, :, 3:], alone) < 1e-12
    full = keys[:, None, None, :] & torch.ones(9, 9, dtype=torch.bool).tril()
    assert max_abs_diff(ttt.attention(q, k, v, full), o) < 1e-12


def test_masks_it_cannot_honour_are_refused():
    q, k, v, _ = qkv(T=6)
    with pytest.raises(TypeError, match="attn_mask must be a boolean tensor"):
        ttt.attention(q, k, v, torch.zeros(6, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match="attn_mask must mark keys, the same for every query"):
        ttt.attention(q, k, v, torch.rand(6, 6) > 0.5)
    with pytest.raises(ValueError, match=r"attn_mask must broadcast to \[B, H, T, T\]"):
        ttt.attention(q, k, v, torch.ones(5, dtype=torch.bool))
    empty = ttt.attention(q[:, :, :0], k[:, :, :0], v[:, :, :0], torch.ones(2, 1, 1, 0, dtype=torch.bool))
    assert empty.shape == (2, 3, 0, 6)


def test_gqa_and_three_dim_inputs_as_sdpa():
    q, k, v, lr = qkv(H=4)
    k2, v2 = k[:, ::2], v[:, ::2]  # 2 key/value heads
    got = ttt.attention(q, k2, v2, is_causal=True, enable_gqa=True)
    want = ttt.attention(q, k2.repeat_interleave(2, 1), v2.repeat_interleave(2, 1), is_causal=True)
    assert max_abs_diff(got, want) < 1e-14
    with pytest.raises(ValueError, match="q and k must have the same shape"):
        ttt.attention(q, k2, v2, is_causal=True)
    assert (
        max_abs_diff(
            ttt.attention(q[0], k[0], v[0], is_causal=True), ttt.attention(q, k, v, is_causal=True)[0]
        )
        < 1e-14
    )


@pytest.mark.parametrize("b", [1, 4])
def test_lr_must_be_finite_and_non_negative_at_every_mini_batch_size(b):
    q, k, v, _ = qkv()
    with pytest.raises(ValueError, match=r"^lr must lie in \[0.0, inf\], got min -1.0"):
        ttt.attention(q, k, v, lr=-1.0, is_causal=True, mini_batch_size=b)
    with pytest.raises(ValueError, match="^lr must be finite"):
        ttt.attention(q, k, v, lr=float("inf"), is_causal=True, mini_batch_size=b)
