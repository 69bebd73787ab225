"""Family layers: the gates they feed the operator, the decay initialisation, padding, impl choice."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import ttt.ops.family
from ttt.layers import Comba, DeltaNet, GatedDeltaNet, KimiDeltaAttention, Longhorn, MatrixState
from ttt.ops.family import dispatch

LAYERS = {
    "deltanet": DeltaNet,
    "gated_deltanet": GatedDeltaNet,
    "kda": KimiDeltaAttention,
    "longhorn": Longhorn,
    "comba": Comba,
}


def _layer(name: str, **kwargs):
    torch.manual_seed(0)
    return LAYERS[name](dim=16, num_heads=2, chunk_size=4, **kwargs).double()


def _x(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, length, 16, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@torch.no_grad()
def test_gated_deltanet_matches_an_explicit_recurrence():
    """y from the layer == projections -> conv -> L2 norm -> S_t = (I - b k k^T) a S + b k v^T -> gated norm."""
    layer = _layer("gated_deltanet", conv_size=None)
    x = _x(1, 7)
    q = F.normalize(layer.q_proj(x).view(1, 7, 2, 8), dim=-1) * 8**-0.5
    k = F.normalize(layer.k_proj(x).view(1, 7, 2, 8), dim=-1)
    v = layer.v_proj(x).view(1, 7, 2, 8)
    beta = torch.sigmoid(layer.b_proj(x))  # [1, T, H]
    alpha = torch.exp(-torch.exp(layer.A_log) * F.softplus(layer.a_proj(x) + layer.dt_bias))
    S = torch.zeros(2, 8, 8, dtype=torch.float64)
    outs = []
    for t in range(7):
        kt, vt, bt = k[0, t], v[0, t], beta[0, t, :, None, None]
        S = alpha[0, t, :, None, None] * S
        S = (
            S
            - bt * kt[:, :, None] * torch.einsum("hk,hkv->hv", kt, S)[:, None, :]
            + bt * kt[:, :, None] * vt[:, None]
        )
        outs.append(torch.einsum("hk,hkv->hv", q[0, t], S))
    o = torch.stack(outs)[None]  # [1, T, H, Dv]
    o = layer.o_norm(o, layer.g_proj(x).view(1, 7, 2, 8))
    torch.testing.assert_close(layer(x)[0], layer.o_proj(o.reshape(1, 7, 16)), atol=1e-12, rtol=0)


@torch.no_grad()
def test_comba_matches_an_explicit_recurrence():
    """S_t = (a - b k p^T) S + b k v^T with p = sigmoid(d) k, read by the corrected query q - D p."""
    layer = _layer("comba", conv_size=None, correction_factor=0.3)
    x = _x(1, 6)
    q = F.normalize(layer.q_proj(x).view(1, 6, 2, 8), dim=-1)
    k = F.normalize(layer.k_proj(x).view(1, 6, 2, 8), dim=-1)
    v = layer.v_proj(x).view(1, 6, 2, 8)
    p = torch.sigmoid(layer.feedback)[:, None] * k[0]  # [T, H, Dk]
    q = (q[0] - layer.D[:, None] * p) * 8**-0.5
    beta = torch.sigmoid(layer.b_proj(x))[0]  # [T, H]
    alpha = torch.exp(-torch.exp(layer.A_log) * F.softplus(layer.a_proj(x) + layer.dt_bias))[0]
    S = torch.zeros(2, 8, 8, dtype=torch.float64)
    outs = []
    for t in range(6):
        read = torch.einsum("hk,hkv->hv", p[t], S)  # p^T S
        S = (
            alpha[t, :, None, None] * S
            + beta[t, :, None, None] * k[0, t][:, :, None] * (v[0, t] - read)[:, None]
        )
        outs.append(torch.einsum("hk,hkv->hv", q[t], S))
    o = layer.o_norm(torch.stack(outs)[None], layer.g_proj(x).view(1, 6, 2, 8))
    torch.testing.assert_close(layer(x)[0], layer.o_proj(o.reshape(1, 6, 16)), atol=1e-12, rtol=0)


def test_gates_reach_the_operator_masked(monkeypatch):
    seen = {}
    real = ttt.ops.family.gated_deltanet

    def spy(q, k, v, **kwargs):
        seen.update(k=k, **kwargs)
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(ttt.ops.family, "gated_deltanet", spy)
    layer = _layer("gated_deltanet")
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    layer(_x(2, 6), mask=mask)
    beta, log_alpha = seen["beta"], seen["log_alpha"]
    assert beta.shape == log_alpha.shape == (2, 2, 6)
    assert ((beta[0] > 0) & (beta[0] < 1)).all() and (log_alpha[0] < 0).all()
    assert (
        (beta[1, :, 4:] == 0).all() and (log_alpha[1, :, 4:] == 0).all() and (seen["k"][1, :, 4:] == 0).all()
    )
    torch.testing.assert_close(seen["k"][0].norm(dim=-1), torch.ones(2, 6, dtype=torch.float64))


def test_mamba_decay_initialisation_ranges():
    torch.manual_seed(0)
    layer = GatedDeltaNet(dim=64, num_heads=64)
    A = torch.exp(layer.A_log)
    dt = F.softplus(layer.dt_bias)
    assert (A > 0).all() and (A <= 16).all()
    assert (dt >= 1e-4 - 1e-9).all() and (dt <= 0.1 + 1e-6).all()


@torch.no_grad()
@pytest.mark.parametrize("name", ["gated_deltanet", "longhorn"])
def test_padded_tokens_leave_the_state_unchanged(name):
    layer = _layer(name)
    x = _x(1, 10)
    mask = torch.arange(10)[None, :] < 6
    _, padded = layer(x, mask=mask)
    _, short = layer(x[:, :6])
    assert isinstance(padded, MatrixState) and padded.nbytes() > 0
    torch.testing.assert_close(padded.S, short.S, atol=1e-12, rtol=0)


@pytest.mark.parametrize(("impl", "decode_impl"), [("chunk", "recurrent"), ("recurrent", "chunk")])
def test_chosen_impl_runs(monkeypatch, impl, decode_impl):
    calls = []
    for form in ("chunk", "recurrent"):
        real = getattr(dispatch, f"{form}_transition")

        def counted(*args, _real=real, _form=form):
            calls.append(_form)
            return _real(*args)

        monkeypatch.setattr(dispatch, f"{form}_transition", counted)
    layer = _layer("gated_deltanet", impl=impl, decode_impl=decode_impl)
    _, state = layer(_x(1, 6))
    layer.step(_x(1, 1), state)
    assert calls == [impl, decode_impl] and layer.last_impl == decode_impl


@torch.no_grad()
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_forms_agree_in_the_layer(name):
    x = _x(1, 6)
    impls = ("chunk", "recurrent", "reference")
    y = {impl: _layer(name, impl=impl)(x)[0] for impl in impls}
    for impl in impls[::2]:
        torch.testing.assert_close(y[impl], y["recurrent"], atol=1e-10, rtol=0)


def test_shapes_and_errors():
    layer = GatedDeltaNet(dim=32, num_heads=4, expand_v=2.0)
    y, state = layer(torch.randn(2, 5, 32))
    assert y.shape == (2, 5, 32) and state.S.shape == (2, 4, 8, 16) and state.S.dtype == torch.float32
    assert math.isclose(layer.o_proj.in_features, 64)
    with pytest.raises(ValueError, match="impl"):
        GatedDeltaNet(dim=32, num_heads=4, impl="triton")
    with pytest.raises(ValueError, match="divisible"):
        DeltaNet(dim=30, num_heads=4)
    with pytest.raises(TypeError, match="MatrixState"):
        layer(torch.randn(2, 5, 32), state=torch.zeros(2, 4, 8, 16))
