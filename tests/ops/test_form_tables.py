"""``ttt.ops.forms``: one table per operator, one meaning of "auto", and the hook a backend registers by."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import ttt.ops.family as fam
from ttt.layers import GatedDeltaNet, TTTLinear
from ttt.ops import forms


def test_every_op_and_layer_has_a_table_and_auto_means_one_thing():
    """Each op's table is declared; off CUDA "auto" is the chunk form, at a decode step the first form
    that declares a decode path (the same rule for the TTT ops, ttt_attention and the family)."""
    q = torch.zeros(1, 1, 4, 8)
    for op in ("ttt_linear", "ttt_mlp", "ttt_attention", *fam.__all__):
        names = [f.name for f in forms.forms_of(op)]
        assert "chunk" in names and "reference" in names, op
        assert forms.resolve(op, "auto", q).name == "chunk"
        decode = [
            f.name for f in forms.forms_of(op) if f.decode and f.refuses(q[:, :, :1], explicit=False) is None
        ]
        want = decode[0] if decode else "chunk"
        assert forms.resolve(op, "auto", q[:, :, :1], decode=True).name == want
    assert forms.check_impl("gated_deltanet", "autograd") == "reference"
    with pytest.raises(ValueError, match="impl must be one of .* for gated_deltanet, got 'triton'"):
        GatedDeltaNet(dim=16, num_heads=2, impl="triton")
    with pytest.raises(ValueError, match="impl must be one of"):
        TTTLinear(dim=16, num_heads=2, decode_impl="fast")


def test_a_registered_backend_runs_by_name_and_by_auto(monkeypatch):
    """A backend registered first is what "auto" picks where it applies and runs by name; where its
    declaration excludes the inputs, "auto" passes it over and naming it raises with the reason."""
    monkeypatch.setitem(forms._TABLES, "gated_deltanet", list(forms.forms_of("gated_deltanet")))
    chunk = next(f for f in forms.forms_of("gated_deltanet") if f.name == "chunk")
    calls = []

    def backend(rule, q, tokens, S0, *, chunk_size):
        calls.append(rule.name)
        return chunk.fn(rule, q, tokens, S0, chunk_size=chunk_size)

    forms.register_form("gated_deltanet", forms.Form("mine", backend, dtypes=(torch.float32,)), first=True)
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 1, 2, 9, 8).unbind(0)
    k = torch.nn.functional.normalize(k, dim=-1)
    beta, log_alpha = torch.rand(1, 2, 9), -torch.rand(1, 2, 9)
    want, _ = fam.gated_deltanet(q, k, v, beta=beta, log_alpha=log_alpha)
    got, _ = fam.gated_deltanet(q, k, v, beta=beta, log_alpha=log_alpha, impl="auto")
    assert calls == ["gated_deltanet"] and torch.equal(got, want)
    fam.gated_deltanet(q.double(), k.double(), v.double(), beta=beta, log_alpha=log_alpha, impl="auto")
    assert calls == ["gated_deltanet"]  # float64 is not declared: "auto" took the chunk form
    with pytest.raises(TypeError, match="impl='mine' cannot run this gated_deltanet call: it takes"):
        fam.gated_deltanet(q.double(), k.double(), v.double(), beta=beta, log_alpha=log_alpha, impl="mine")
    layer = GatedDeltaNet(dim=16, num_heads=2)
    layer(torch.randn(1, 5, 16))
    assert layer.last_impl == "mine" and calls[-1] == "gated_deltanet"
    with pytest.raises(ValueError, match="taken"):
        forms.register_form("gated_deltanet", dataclasses.replace(chunk, name="other", aliases=("mine",)))
