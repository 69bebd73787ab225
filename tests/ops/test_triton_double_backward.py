"""The Triton forms' backward is a kernel, not itself differentiable: asking for a second derivative through
it raises instead of returning a silently incomplete gradient (the chunked forms are twice-differentiable)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import ttt  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("op", ["ttt_linear", "ttt_mlp"])
def test_double_backward_through_triton_raises(op):
    g = torch.Generator().manual_seed(0)
    B, H, T, D, M = 1, 2, 9, 16, 64
    q, k, v = (torch.randn(B, H, T, D, generator=g).to(DEVICE).requires_grad_() for _ in range(3))
    lr = torch.full((B, H, T), 0.1, device=DEVICE)
    ln = (torch.ones(H, D, device=DEVICE), torch.zeros(H, D, device=DEVICE))
    if op == "ttt_linear":
        state = (torch.randn(H, D, D, generator=g).to(DEVICE) * 0.1, torch.zeros(H, D, device=DEVICE))
    else:
        state = (torch.randn(H, D, M, generator=g).to(DEVICE) * 0.1, torch.zeros(H, M, device=DEVICE),
                 torch.randn(H, M, D, generator=g).to(DEVICE) * 0.1, torch.zeros(H, D, device=DEVICE))  # fmt: skip
    fn = getattr(ttt.ops, op)
    o = fn(q, k, v, lr, *ln, initial_state=state, mini_batch_size=8, impl="triton").output
    (dq,) = torch.autograd.grad((o * o).sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        dq.sum().backward()
