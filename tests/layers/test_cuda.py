"""CUDA checks of the layers (skipped without a GPU): every mixer decodes like it prefills on the device,
and TTTLinear's Triton path matches its chunk path in the forward and in every parameter gradient."""

from __future__ import annotations

import pytest
import torch

from ttt.layers import MIXERS, TTTLinear

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

KWARGS = {"swa": {"window": 8}, "mamba2": {"d_state": 16}}


@torch.no_grad()
@pytest.mark.parametrize("name", sorted(MIXERS))
def test_step_loop_equals_forward_on_cuda(name):
    torch.manual_seed(0)
    layer = MIXERS[name](dim=64, num_heads=4, **KWARGS.get(name, {})).cuda()
    x = torch.randn(2, 37, 64, device="cuda")
    y, _ = layer(x)
    state = layer.init_state(2, device="cuda", dtype=torch.float32)
    outs = []
    for t in range(37):
        y_t, state = layer.step(x[:, t : t + 1], state)
        outs.append(y_t)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(torch.cat(outs, dim=1), y, atol=2e-4, rtol=2e-3)


@pytest.mark.parametrize("share_qk", [False, True])
def test_ttt_linear_triton_matches_chunk(share_qk):
    torch.manual_seed(0)
    chunk = TTTLinear(dim=256, num_heads=4, share_qk=share_qk, use_gate=share_qk, impl="chunk").cuda()
    triton = TTTLinear(dim=256, num_heads=4, share_qk=share_qk, use_gate=share_qk, impl="auto").cuda()
    triton.load_state_dict(chunk.state_dict())
    x = torch.randn(2, 100, 256, device="cuda")
    mask = torch.arange(100, device="cuda")[None, :] < torch.tensor([[100], [61]], device="cuda")
    outs = []
    for layer in (chunk, triton):
        y, _ = layer(x, mask=mask)
        (y * torch.linspace(-1, 1, 256, device="cuda")).sum().backward()
        outs.append((y, {n: p.grad for n, p in layer.named_parameters()}))
    assert triton.last_impl == "triton"
    torch.testing.assert_close(outs[1][0], outs[0][0], atol=1e-4, rtol=1e-3)
    for name, grad in outs[0][1].items():
        torch.testing.assert_close(
            outs[1][1][name], grad, atol=1e-4, rtol=1e-3, msg=lambda m, n=name: f"{n}: {m}"
        )
