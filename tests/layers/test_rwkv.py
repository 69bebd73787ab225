"""RWKV-7 layer against a token-by-token float64 transcription of the paper's equations (arXiv 2503.14456),
in the paper's own state layout ``P [Dv, Dk]`` (the family operator uses the transpose)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ttt.layers import RWKV7

DIM, HEADS = 16, 2


def _layer(**kwargs) -> RWKV7:
    torch.manual_seed(0)
    layer = RWKV7(dim=DIM, num_heads=HEADS, chunk_size=4, **kwargs).double()
    with torch.no_grad():  # move the low-rank factors off zero so every term is exercised
        for lora in (layer.w_lora, layer.a_lora, layer.g_lora):
            lora.A.normal_(0, 0.3)
    return layer


@torch.no_grad()
def paper_rwkv7(layer: RWKV7, x: torch.Tensor) -> torch.Tensor:
    """One token at a time, as the paper writes it: P_t = P_{t-1} (diag(w) - kk^T (a kk)) + v^T k~,
    o = P_t r + bonus, GroupNorm, gate, output projection."""
    B, T, C = x.shape
    H, D = HEADS, C // HEADS
    P = torch.zeros(B, H, D, D, dtype=x.dtype)  # [value, key]
    prev = torch.zeros(B, C, dtype=x.dtype)
    ys = []
    for t in range(T):
        xt = x[:, t]
        mix = {c: xt + (prev - xt) * layer.mu[c] for c in layer.MIXES}
        prev = xt
        r, k, v = layer.r_proj(mix["r"]), layer.k_proj(mix["k"]), layer.v_proj(mix["v"])
        wl, al, gl = layer.w_lora, layer.a_lora, layer.g_lora
        w = torch.exp(-math.exp(-0.5) * torch.sigmoid(wl.bias + torch.tanh(mix["w"] @ wl.A) @ wl.B))
        a = torch.sigmoid(al.bias + mix["a"] @ al.A @ al.B)
        g = torch.sigmoid(mix["g"] @ gl.A) @ gl.B
        kk = F.normalize((k * layer.k_k).view(B, H, D), dim=-1)
        k = (k * (1 + (a - 1) * layer.k_a)).view(B, H, D)
        r, v, w, a = (z.view(B, H, D) for z in (r, v, w, a))
        transition = torch.diag_embed(w) - kk[..., :, None] * (a * kk)[..., None, :]  # [B, H, Dk, Dk]
        P = P @ transition + v[..., :, None] * k[..., None, :]
        o = (P @ r[..., None])[..., 0]  # [B, H, Dv]
        o = F.group_norm(o.reshape(B, C), H, layer.o_norm.weight, layer.o_norm.bias, eps=64e-5)
        o = o + ((r * k * layer.r_k).sum(-1, keepdim=True) * v).reshape(B, C)
        ys.append(layer.o_proj(o * g))
    return torch.stack(ys, dim=1)


@pytest.mark.parametrize("impl", ["chunk", "recurrent"])
def test_rwkv7_is_the_paper_recurrence(impl):
    layer = _layer(impl=impl)
    x = torch.randn(2, 11, DIM, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.testing.assert_close(layer(x)[0], paper_rwkv7(layer, x), atol=1e-10, rtol=0)
