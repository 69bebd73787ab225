"""RMSNorm, SwiGLU, ShortConv (forward == step, split == whole, padding) and RoPE."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ttt.modules import GatedRMSNorm, RMSNorm, ShortConv, SwiGLU, apply_rotary, rotary_cos_sin


def test_rmsnorm_unit_rms_and_dtype():
    norm = RMSNorm(8, eps=0.0)
    x = torch.randn(2, 3, 8, dtype=torch.bfloat16)
    y = norm(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float().pow(2).mean(-1), torch.ones(2, 3), atol=2e-2, rtol=0)


def test_gated_rmsnorm_is_norm_times_silu():
    norm = GatedRMSNorm(8)
    x, g = torch.randn(4, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64)
    torch.testing.assert_close(norm(x, g), RMSNorm(8)(x) * F.silu(g))


def test_swiglu_shape_and_default_width():
    mlp = SwiGLU(96)
    assert mlp.gate_proj.out_features == 256  # 2/3 * 4 * 96 = 256
    assert mlp(torch.randn(2, 5, 96)).shape == (2, 5, 96)


@pytest.mark.parametrize("activation", [None, "silu"])
@torch.no_grad()
def test_short_conv_step_split_and_reference(activation):
    torch.manual_seed(0)
    conv = ShortConv(6, 4, bias=True, activation=activation).double()
    x = torch.randn(2, 11, 6, dtype=torch.float64)
    y, _ = conv(x)
    # reference: left zero padding then a plain depthwise conv
    ref = F.conv1d(F.pad(x.transpose(1, 2), (3, 0)), conv.conv.weight, conv.conv.bias, groups=6).transpose(
        1, 2
    )
    torch.testing.assert_close(y, F.silu(ref) if activation else ref)
    cache, outs = conv.init_cache(2, dtype=torch.float64), []
    for t in range(11):
        y_t, cache = conv(x[:, t : t + 1], cache)  # a decode step is a one-token call
        outs.append(y_t)
    torch.testing.assert_close(torch.cat(outs, 1), y)
    y1, cache = conv(x[:, :2])
    y2, _ = conv(x[:, 2:], cache)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y)


@torch.no_grad()
def test_short_conv_padding_keeps_real_cache():
    torch.manual_seed(0)
    conv = ShortConv(3, 4).double()
    x = torch.randn(2, 7, 3, dtype=torch.float64)
    mask = torch.tensor([[True] * 7, [True] * 2 + [False] * 5])
    _, cache = conv(x, mask=mask)
    _, cache_short = conv(x[1:, :2])
    torch.testing.assert_close(cache[1:], cache_short)


@pytest.mark.parametrize("bad", [0, 2.5, "4", True])
def test_short_conv_refuses_a_kernel_that_is_not_a_positive_int(bad):
    """Every mixer's ``conv_size`` reaches ShortConv: 2.5 ended in a tensor-shape error, True passed as 1."""
    with pytest.raises(ValueError, match="kernel_size must be an int >= 1"):
        ShortConv(8, bad)


def test_rotary_preserves_norm_and_is_relative():
    d = 8
    q, k = torch.randn(1, 1, 1, d, dtype=torch.float64), torch.randn(1, 1, 1, d, dtype=torch.float64)

    def rot(x, p):
        cos, sin = rotary_cos_sin(torch.tensor([p]), d)
        return apply_rotary(x, cos, sin)

    torch.testing.assert_close(rot(q, 5).norm(), q.norm())
    # <R_m q, R_n k> depends on m - n only
    torch.testing.assert_close((rot(q, 7) * rot(k, 3)).sum(), (rot(q, 14) * rot(k, 10)).sum())
    with pytest.raises(ValueError, match="even"):
        rotary_cos_sin(torch.arange(3), 5)
