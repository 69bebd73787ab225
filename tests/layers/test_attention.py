"""Attention-specific checks: the math against an explicit softmax, the window, the cache size."""

from __future__ import annotations

import pytest
import torch

from ttt.layers import Attention, KVCache, SlidingWindowAttention, make_mixer
from ttt.modules import apply_rotary, rotary_cos_sin


def _explicit(layer: Attention, x: torch.Tensor, window: int | None, sink: int = 0) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) + causal/window mask) v, head by head, no SDPA; keys before ``sink`` are
    visible beside the window."""
    batch, length, _ = x.shape
    h, g, d = layer.num_heads, layer.num_kv_heads, layer.head_dim
    q = layer.q_proj(x).view(batch, length, h, d).transpose(1, 2)
    k = layer.k_proj(x).view(batch, length, g, d).transpose(1, 2).repeat_interleave(h // g, dim=1)
    v = layer.v_proj(x).view(batch, length, g, d).transpose(1, 2).repeat_interleave(h // g, dim=1)
    cos, sin = rotary_cos_sin(torch.arange(length), d)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    i, j = torch.arange(length)[:, None], torch.arange(length)[None, :]
    allowed = (j <= i) & (((i - j < window) | (j < sink)) if window else True)
    scores = (q @ k.transpose(-1, -2)) / d**0.5
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
    return layer.o_proj((probs @ v).transpose(1, 2).reshape(batch, length, -1))


@torch.no_grad()
@pytest.mark.parametrize("window", [None, 1, 4])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_matches_explicit_softmax(window, kv_heads):
    torch.manual_seed(0)
    layer = Attention(dim=32, num_heads=4, num_kv_heads=kv_heads, window=window).double()
    x = torch.randn(2, 13, 32, dtype=torch.float64)
    torch.testing.assert_close(layer(x)[0], _explicit(layer, x, window), atol=1e-12, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("window, sink", [(1, 1), (4, 2), (3, 20)])
def test_attention_sinks_match_explicit_softmax_and_stay_cached(window, sink):
    torch.manual_seed(0)
    layer = SlidingWindowAttention(dim=32, num_heads=4, num_kv_heads=2, window=window, sink=sink).double()
    x = torch.randn(2, 13, 32, dtype=torch.float64)
    want = _explicit(layer, x, window, sink)
    torch.testing.assert_close(layer(x)[0], want, atol=1e-12, rtol=0)
    y, state = layer(x[:, :7])
    outs = [y]
    for t in range(7, 13):
        y, state = layer.step(x[:, t : t + 1], state)
        outs.append(y)
        # the sink tokens and the window - 1 newest ones, nothing else
        assert state.positions[0].tolist() == sorted(
            {*range(min(sink, t + 1)), *range(t + 2 - window, t + 1)}
        )
    torch.testing.assert_close(torch.cat(outs, dim=1), want, atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="sink must be an int >= 0, and 0 without a window"):
        Attention(dim=32, num_heads=4, sink=2)


@torch.no_grad()
def test_sliding_window_cache_stays_bounded():
    torch.manual_seed(0)
    layer = SlidingWindowAttention(dim=16, num_heads=2, window=6).double()
    state = layer.init_state(1)
    for _ in range(40):
        _, state = layer.step(torch.randn(1, 1, 16, dtype=torch.float64), state)
    assert state.k.shape[2] == 5  # the next token sees itself plus the 5 cached ones
    assert int(state.lengths) == 40


@torch.no_grad()
def test_full_cache_grows_and_reports_bytes():
    layer = Attention(dim=16, num_heads=2)
    _, state = layer(torch.randn(3, 10, 16))
    assert isinstance(state, KVCache) and state.k.shape == (3, 2, 10, 8)
    assert state.nbytes() == 2 * 3 * 2 * 10 * 8 * 4


def test_constructor_errors():
    with pytest.raises(ValueError, match="num_heads"):
        Attention(dim=30, num_heads=4)
    with pytest.raises(ValueError, match="even"):
        Attention(dim=12, num_heads=4)
    with pytest.raises(ValueError, match="window"):
        Attention(dim=16, num_heads=2, window=0)
    for bad in (2.5, True, "4"):  # the windowed mixer's window is this check too
        with pytest.raises(ValueError, match="window must be None or an int >= 1"):
            Attention(dim=16, num_heads=2, window=bad)
        with pytest.raises(ValueError, match="window"):  # its annotation refuses it first
            make_mixer("windowed", 16, 2, {"window": bad})
    for bad in (-1, None, 2.5, "4", True):  # 2.5 / "4" ended in tensor errors, True passed as 1
        with pytest.raises(ValueError, match="conv_size must be an int >= 0"):
            Attention(dim=16, num_heads=2, conv_size=bad)


def test_wrong_state_raises():
    layer = Attention(dim=16, num_heads=2)
    with pytest.raises(TypeError, match="KVCache"):
        layer(torch.randn(1, 2, 16), state=(1, 2))
    with pytest.raises(ValueError, match="B=2"):
        layer(torch.randn(1, 2, 16), state=layer.init_state(2))


@torch.no_grad()
def test_short_convolutions_with_identity_kernels_change_nothing():
    """conv_size > 0 convolves the q, k, v projections; with kernels that pass the current token through,
    the layer is the plain one."""
    torch.manual_seed(0)
    plain = Attention(dim=32, num_heads=4, num_kv_heads=2).double()
    conv = Attention(dim=32, num_heads=4, num_kv_heads=2, conv_size=4).double()
    conv.load_state_dict(plain.state_dict(), strict=False)
    for c in conv.convs:
        c.conv.weight.zero_()
        c.conv.weight[:, 0, -1] = 1.0  # the last tap is the current token
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    torch.testing.assert_close(conv(x)[0], plain(x)[0], atol=1e-12, rtol=0)
    assert [c.conv.weight.shape[0] for c in conv.convs] == [32, 16, 16]
    assert conv.init_state(3).nbytes() == 3 * (32 + 16 + 16) * 3 * 8  # float64 caches of K - 1 = 3 inputs


def _far_gated_layer(window: int, sink: int, kv_heads: int) -> SlidingWindowAttention:
    torch.manual_seed(0)
    layer = SlidingWindowAttention(
        dim=32, num_heads=4, num_kv_heads=kv_heads, window=window, sink=sink, far_gate=True
    ).double()
    with torch.no_grad():  # away from their zero start, so every term of the gate is checked
        layer.far_bias.normal_()
        layer.far_proj.weight.normal_(std=0.3)
    return layer


@torch.no_grad()
@pytest.mark.parametrize("window, sink, kv_heads", [(4, 0, 4), (3, 2, 2), (20, 0, 2)])
def test_far_gate_matches_explicit_share_and_decodes_the_same(window, sink, kv_heads):
    """alpha = Z_w / (Z_w + n_far exp(b + u.x)) on each head's window softmax, written out; 1 while no key
    lies beyond the window; prefill + step (the forward's and the preallocated cache's) give the same."""
    from ttt.layers.attention import attention_decode_step_, static_kv_cache
    from ttt.layers.protocol import merge_heads, split_heads

    layer = _far_gated_layer(window, sink, kv_heads)
    x = torch.randn(2, 13, 32, dtype=torch.float64)
    batch, length, _ = x.shape
    h, g, d = layer.num_heads, layer.num_kv_heads, layer.head_dim
    q = split_heads(layer.q_proj(x), h)
    k = split_heads(layer.k_proj(x), g).repeat_interleave(h // g, dim=1)
    v = split_heads(layer.v_proj(x), g).repeat_interleave(h // g, dim=1)
    cos, sin = rotary_cos_sin(torch.arange(length), d)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    i, j = torch.arange(length)[:, None], torch.arange(length)[None, :]
    near = (j <= i) & ((i - j < window) | (j < sink))
    scores = (q @ k.transpose(-1, -2)) / d**0.5
    z_window = scores.masked_fill(~near, float("-inf")).exp().sum(-1)  # [B, H, T]
    n_far = (torch.arange(length) + 1 - window - sink).clamp(min=0).double()
    z_far = n_far * torch.exp(layer.far_bias[:, None] + layer.far_proj(x).transpose(1, 2))
    alpha = z_window / (z_window + z_far)
    probs = scores.masked_fill(~near, float("-inf")).softmax(dim=-1)
    want = layer.o_proj(merge_heads(alpha[..., None] * (probs @ v)))
    torch.testing.assert_close(layer(x)[0], want, atol=1e-12, rtol=0)
    assert (alpha[..., : window + sink] == 1).all() and (alpha[..., window + sink :] < 1).all()

    y, state = layer(x[:, :5])
    static = static_kv_cache(layer, state, max_len=length)
    outs, static_outs = [y], [y]
    for t in range(5, length):
        y, state = layer.step(x[:, t : t + 1], state)
        outs.append(y)
        static_outs.append(attention_decode_step_(layer, x[:, t : t + 1], static))
    torch.testing.assert_close(torch.cat(outs, dim=1), want, atol=1e-12, rtol=0)
    torch.testing.assert_close(torch.cat(static_outs, dim=1), want, atol=1e-12, rtol=0)


@torch.no_grad()
def test_window_split_splits_the_full_softmax_at_the_window():
    """logaddexp(lse_window, lse_far) is the full causal softmax's normaliser; n_far the keys beyond the
    window and the sinks; the outputs are the full attention's and the bare window's (before o_proj), and
    the full one is the window's share of the window's plus the rest's."""
    from ttt.layers.protocol import merge_heads, split_heads

    layer = _far_gated_layer(window=3, sink=1, kv_heads=2)
    x = torch.randn(2, 11, 32, dtype=torch.float64)
    split = layer.window_split(x)
    lse_window, lse_far, n_far = split.lse_window, split.lse_far, split.n_far
    assert n_far.tolist() == [0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7]
    assert torch.isneginf(lse_far[..., :4]).all() and torch.isfinite(lse_far[..., 4:]).all()
    full = Attention(dim=32, num_heads=4, num_kv_heads=2).double()
    full.load_state_dict(layer.state_dict(), strict=False)
    h, g, d = 4, 2, 8
    q = split_heads(full.q_proj(x), h)
    k = split_heads(full.k_proj(x), g).repeat_interleave(h // g, dim=1)
    cos, sin = rotary_cos_sin(torch.arange(11), d)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    causal = torch.ones(11, 11, dtype=torch.bool).tril()
    want = torch.logsumexp(((q @ k.transpose(-1, -2)) / d**0.5).masked_fill(~causal, float("-inf")), -1)
    torch.testing.assert_close(torch.logaddexp(lse_window, lse_far), want, atol=1e-12, rtol=0)
    bare = SlidingWindowAttention(dim=32, num_heads=4, num_kv_heads=2, window=3, sink=1).double()
    bare.load_state_dict(layer.state_dict(), strict=False)
    for module, out in ((full, split.out_full), (bare, split.out_window)):
        seen = []
        hook = module.o_proj.register_forward_pre_hook(lambda m, a, seen=seen: seen.append(a[0]))
        module(x)
        hook.remove()
        torch.testing.assert_close(merge_heads(out), seen[0], atol=1e-12, rtol=0)
    # with b = lse_far - log n_far at one token, the gate there is the window's true share Z_w / Z
    t = 8
    layer.far_proj.weight.zero_()
    layer.far_bias.copy_(lse_far[0, :, t] - torch.log(n_far[t].double()))
    share = layer.window_share(x, lse_window, torch.arange(11))[0, :, t]
    torch.testing.assert_close(share, torch.exp(lse_window - want)[0, :, t], atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="far_gate must be a bool, and False without a window"):
        Attention(dim=32, num_heads=4, far_gate=True)
