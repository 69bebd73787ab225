"""Additive family layers against explicit formulas (linear attention, RetNet, Mamba2); forms agree."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ttt.ops.family
from ttt.layers import HGRN2, GatedLinearAttention, HebbianFastWeights, LinearAttention, Mamba2, RetNet
from ttt.modules import apply_rotary, rotary_cos_sin

LAYERS = {"linear_attention": LinearAttention, "retnet": RetNet, "mamba2": Mamba2, "gla": GatedLinearAttention,
          "hgrn2": HGRN2, "hebbian": HebbianFastWeights}  # fmt: skip


def _layer(name: str, **kwargs):
    torch.manual_seed(0)
    return LAYERS[name](dim=16, num_heads=2, chunk_size=4, **kwargs).double()


def _x(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, length, 16, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _heads(t: torch.Tensor, h: int = 2) -> torch.Tensor:
    return t.view(*t.shape[:2], h, -1).transpose(1, 2)  # [B, H, T, D]


@torch.no_grad()
def test_retnet_decay_keeps_its_precision_and_is_not_state():
    # the decay is a constant of the layer, not a tensor to save or cast: under .to(bfloat16) a stored copy
    # was rounded (gamma 1 - 2^-10 to 1 - 2^-9 in block 5), and transformers' meta-device loading left it
    # uninitialised
    layer = RetNet(64, num_heads=8).to(torch.bfloat16)
    decay = torch.exp(layer.log_gamma(torch.float32, torch.device("cpu")))
    want = 1 - 2.0 ** (-5.0 - torch.arange(8, dtype=torch.float64))
    torch.testing.assert_close(decay.double(), want, atol=1e-7, rtol=0)
    assert "log_gamma" not in dict(layer.named_buffers())


@torch.no_grad()
def test_linear_attention_is_the_normalised_causal_form():
    layer = _layer("linear_attention")
    x = _x(2, 9)
    q, k = F.elu(_heads(layer.q_proj(x))) + 1, F.elu(_heads(layer.k_proj(x))) + 1
    v = _heads(layer.v_proj(x))
    scores = (q @ k.transpose(-1, -2)).tril()  # [B, H, T, T]
    o = (scores @ v) / scores.sum(-1, keepdim=True)
    want = layer.o_proj(o.transpose(1, 2).reshape(2, 9, 16))
    torch.testing.assert_close(layer(x)[0], want, atol=1e-12, rtol=0)


@torch.no_grad()
def test_retnet_is_the_decayed_parallel_form():
    layer = _layer("retnet")
    x = _x(1, 9)
    q, k, v = _heads(layer.q_proj(x)), _heads(layer.k_proj(x)), _heads(layer.v_proj(x))
    cos, sin = rotary_cos_sin(torch.arange(9), 8)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    gamma = torch.tensor([1 - 2.0**-5, 1 - 2.0**-6], dtype=torch.float64)
    t = torch.arange(9)
    decay = gamma[:, None, None] ** (t[:, None] - t[None, :]).clamp(min=0) * (t[:, None] >= t[None, :])
    o = ((q @ k.transpose(-1, -2)) * 8**-0.5 * decay) @ v  # [1, H, T, D]
    o = layer.o_norm(o.transpose(1, 2), layer.g_proj(x).view(1, 9, 2, 8))
    torch.testing.assert_close(layer(x)[0], layer.o_proj(o.reshape(1, 9, 16)), atol=1e-12, rtol=0)


@torch.no_grad()
def test_mamba2_is_the_ssd_recurrence():
    layer = _layer("mamba2", d_state=4)
    x = _x(1, 7)
    z, xbc, dt_raw = layer.in_proj(x).split([32, 32 + 8, 2], dim=-1)
    xbc, _ = layer.conv(xbc)
    u, b, c = xbc.split([32, 4, 4], dim=-1)
    dt = F.softplus(dt_raw + layer.dt_bias)  # [1, T, H]
    A = -torch.exp(layer.A_log)
    S = torch.zeros(2, 4, 16, dtype=torch.float64)  # [H, N, P]
    ys = []
    for t in range(7):
        xt = u[0, t].view(2, 16)
        S = (
            torch.exp(dt[0, t] * A)[:, None, None] * S
            + dt[0, t][:, None, None] * b[0, t][None, :, None] * xt[:, None]
        )
        ys.append(torch.einsum("n,hnp->hp", c[0, t], S) + layer.D[:, None] * xt)
    y = torch.stack(ys).reshape(1, 7, 32)
    want = layer.out_proj(layer.norm(y * F.silu(z)))
    torch.testing.assert_close(layer(x)[0], want, atol=1e-12, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_forms_agree_in_the_layer(name):
    x = _x(1, 6)
    impls = ("chunk", "recurrent", "reference")
    kwargs = {"d_state": 8} if name == "mamba2" else {}
    y = {impl: _layer(name, impl=impl, **kwargs)(x)[0] for impl in impls}
    for impl in impls[::2]:
        torch.testing.assert_close(y[impl], y["recurrent"], atol=1e-10, rtol=0)


def test_gla_gate_range_and_constructor_errors():
    gla = _layer("gla")
    log_alpha = F.logsigmoid(gla.gk_proj(_x(1, 5))) / 16
    assert (log_alpha < 0).all() and (log_alpha > -1).all()
    assert gla.head_k_dim == 4 and gla.head_v_dim == 8  # expand_k = 0.5
    with pytest.raises(ValueError, match="expand_k"):
        GatedLinearAttention(dim=16, num_heads=16)
    with pytest.raises(ValueError, match="even"):
        RetNet(dim=6, num_heads=2)


def test_empty_padded_row_stays_finite():
    layer = LinearAttention(dim=16, num_heads=2)
    mask = torch.tensor([[True, True, True], [False, False, False]])
    y, _ = layer(torch.randn(2, 3, 16), mask=mask)
    assert torch.isfinite(y).all()


@torch.no_grad()
def test_hebbian_layer_runs_the_hebbian_rule():
    """The layer's memory is ``ttt.ops.family.hebbian`` (S_t = lambda S + eta k v^T, per-head constants)
    and its output the rule's read-out through the output norm and projection; trained-looking rates."""
    layer = _layer("hebbian")
    layer.decay_logit.copy_(torch.tensor([1.0, 3.0]))
    layer.lr_raw.copy_(torch.tensor([-0.5, 0.7]))
    x = _x(2, 11)
    q = F.normalize(_heads(layer.q_proj(x)), dim=-1, eps=1e-6)
    k = F.normalize(_heads(layer.k_proj(x)), dim=-1, eps=1e-6)
    decay, lr = layer.rates()
    o, S = ttt.ops.family.hebbian(q, k, _heads(layer.v_proj(x)), decay=decay, lr=lr, scale=1.0,
                                  output_final_state=True, impl="recurrent")  # fmt: skip
    want = layer.o_proj(layer.o_norm(o.transpose(1, 2)).reshape(2, 11, 16))
    y, state = layer(x)
    torch.testing.assert_close(y, want, atol=1e-12, rtol=0)
    torch.testing.assert_close(state.S, S, atol=1e-12, rtol=0)
