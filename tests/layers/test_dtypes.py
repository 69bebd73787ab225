"""What every mixer does with dtypes and non-finite input: bf16 autocast, a dtype unlike its parameters,
NaN in x."""

from __future__ import annotations

import copy

import pytest
import torch

from ttt.testing import budget

from .mixer_cases import CASES, DIM, make


def _x(batch: int, length: int, dtype=torch.float32, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, length, DIM, generator=gen, dtype=dtype)


@pytest.fixture(params=sorted(CASES))
def case(request) -> str:
    return request.param


def test_every_registered_mixer_has_a_case():
    from ttt.layers import MIXERS

    assert set(MIXERS) <= {spec["name"] for spec in CASES.values()}


def test_bf16_autocast_matches_float32(case):
    layer = make(case).float()
    x = _x(2, 21).requires_grad_()  # 21 tokens: two full chunks of 8 and a partial one
    want, _ = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, state = layer(x)
        y_t, _ = layer.step(x[:, :1], None)
    y.float().square().sum().backward()
    grads = {"x": x.grad, **{name: p.grad for name, p in layer.named_parameters()}}
    bad = [name for name, g in grads.items() if g is None or not torch.isfinite(g).all()]
    assert not bad, f"no finite gradient under autocast for {bad}"
    assert torch.isfinite(y_t).all()
    # low-precision reference: the whole layer in bf16 (R13 budget: how much bf16 rounding the data causes)
    low, _ = copy.deepcopy(layer).bfloat16()(x.detach().bfloat16())
    err, bound = budget(y.detach(), want.detach(), low.detach(), torch.bfloat16)
    assert err <= bound, f"autocast vs float32: max err {err:.3e} > budget {bound:.3e}"


def test_input_dtype_must_match_the_parameters(case):
    layer = make(case)  # float64 parameters
    want = rf"{type(layer).__name__}: x is torch.float32 but the layer's parameters are torch.float64"
    with pytest.raises(TypeError, match=want):
        layer(_x(2, 5))
    with pytest.raises(TypeError, match=r"layer.to\(torch.float32\)"):
        layer.step(_x(2, 1), None)
    # autocast casts the projections itself: a bf16 x into a float32 layer is fine there
    layer = layer.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = layer(_x(2, 5, dtype=torch.bfloat16))
    assert torch.isfinite(y).all()


@torch.no_grad()
def test_nan_input_propagates_or_names_the_input(case):
    layer = make(case)
    x = _x(2, 9, dtype=torch.float64)
    x[1, 3, 5] = float("nan")
    try:
        y, _ = layer(x)
    except ValueError as err:
        # the family layers' gate check: it must name the layer input, not only a gate the user never passed
        # (a windowed mixer's inner layer names itself: the input x is the same)
        names = {type(m).__name__ for m in (layer, getattr(layer, "inner", layer))}
        assert any(f"{n} computed" in str(err) for n in names) and "input x" in str(err)
    else:
        assert torch.isnan(y[1]).any() and torch.isfinite(y[0]).all()
