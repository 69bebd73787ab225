"""TTTLinear / TTTMLP specifics: the wiring against an explicit static model, the lr gate, padding and the
fast weights, token_eta, the (M) variant, and that the chosen ``impl`` really ran."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import ttt.ops
from ttt.layers import TTTMLP, TTTLayerState, TTTLinear
from ttt.modules import apply_rotary, rotary_cos_sin
from ttt.ops import forms
from ttt.testing import assert_padded_matches_rows

LAYERS = {"linear": TTTLinear, "mlp": TTTMLP}


def _layer(kind: str, **kwargs):
    torch.manual_seed(0)
    return LAYERS[kind](dim=16, num_heads=2, mini_batch_size=4, **kwargs).double()


def _x(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, length, 16, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _ln(z, w, b, eps=1e-6):
    return F.layer_norm(z, z.shape[-1:], eps=eps) * w[:, None, :] + b[:, None, :]


@torch.no_grad()
@pytest.mark.parametrize(("use_gate", "rope"), [(False, True), (True, True), (False, False)])
def test_zero_inner_lr_is_the_static_initial_model(use_gate, rope):
    """base_lr = 0 freezes the fast weights: y = o(post_norm(q + LN(q W0 + b0))) with RoPE mod b (or none)."""
    layer = _layer("linear", base_lr=0.0, use_gate=use_gate, rope=rope)
    x = _x(2, 11)
    q = layer.q_proj(x).view(2, 11, 2, 8).transpose(1, 2)
    if rope:
        cos, sin = rotary_cos_sin(torch.arange(11) % 4, 8)
        q = apply_rotary(q, cos, sin)
    o = q + _ln(q @ layer.W0 + layer.b0[:, None, :], layer.ln_weight, layer.ln_bias)
    y = layer.post_norm(o.transpose(1, 2).reshape(2, 11, 16))
    if use_gate:
        y = F.gelu(layer.g_proj(x), approximate="tanh") * y
    torch.testing.assert_close(layer(x)[0], layer.o_proj(y), atol=1e-12, rtol=0)


def test_lr_gate_token_eta_and_padding_reach_the_operator(monkeypatch):
    seen = {}

    def spy(q, k, v, lr, ln_weight, ln_bias, **kwargs):
        seen.update(lr=lr, **kwargs)
        return real(q, k, v, lr, ln_weight, ln_bias, **kwargs)

    real = ttt.ops.ttt_linear
    monkeypatch.setattr(ttt.ops, "ttt_linear", spy)
    layer = _layer("linear", base_lr=0.5)
    x = _x(2, 8)
    mask = torch.tensor([[True] * 8, [True] * 5 + [False] * 3])
    layer(x, mask=mask)
    want = 0.5 * torch.sigmoid(layer.lr_gate(x)).transpose(1, 2) / 8
    # a padded causal call packs each row's real tokens along T (row 0: 8, row 1: 5)
    torch.testing.assert_close(seen["lr"][0], torch.cat([want[0], want[1, :, :5]], dim=-1))
    assert seen["cu_seqlens"].tolist() == [0, 8, 13]
    torch.testing.assert_close(seen["token_eta"], 1.0 / torch.arange(1, 5, dtype=torch.float64))
    assert seen["mini_batch_size"] == 4 and seen["causal"] is True


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_constant_token_eta_base(kind):
    """token_eta_base="constant": 1/b at every position (plus the offset); the end-of-mini-batch weights
    equal the harmonic rule's (both read token_eta[b-1] = 1/b there)."""
    layer = _layer(kind, token_eta_base="constant")
    torch.testing.assert_close(layer.token_eta(), torch.full((4,), 0.25, dtype=torch.float64))
    harmonic = _layer(kind)
    x = _x(1, 8)
    with torch.no_grad():
        _, s_const = layer(x)
        _, s_harm = harmonic(x)
    for a, b in zip(s_const.ttt.weights, s_harm.ttt.weights):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="token_eta_base"):
        _layer(kind, token_eta_base="linear")


def test_fixed_token_eta_gets_no_gradient():
    layer = _layer("linear", learn_token_eta=False)
    layer(_x(1, 8))[0].sum().backward()
    assert not layer.token_eta_offset.requires_grad and layer.token_eta_offset.grad is None
    assert layer.W0.grad is not None
    torch.testing.assert_close(layer.token_eta(), 1.0 / torch.arange(1, 5, dtype=torch.float64))


def test_token_eta_is_clamped_at_zero():
    layer = _layer("linear")
    with torch.no_grad():
        layer.token_eta_offset.copy_(torch.tensor([0.5, -1.0, 0.0, -0.1], dtype=torch.float64))
    torch.testing.assert_close(layer.token_eta(), torch.tensor([1.5, 0.0, 1 / 3, 0.15], dtype=torch.float64))


@torch.no_grad()
@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_padded_tokens_do_not_update_fast_weights(kind):
    """8 real tokens (2 mini-batches) then 8 padded: the fast weights stop after the 8th token."""
    layer = _layer(kind)
    x = _x(1, 16)
    mask = torch.arange(16)[None, :] < 8
    _, padded = layer(x, mask=mask)
    _, short = layer(x[:, :8])
    assert padded.ttt.offset == short.ttt.offset == 0
    for got, want in zip(padded.ttt.anchor, short.ttt.anchor):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


@pytest.mark.parametrize(
    ("kind", "impl", "decode_impl"),
    [("linear", "chunk", "recurrent"), ("linear", "reference", "reference"), ("mlp", "chunk", "chunk"),
     ("mlp", "reference", "chunk")],
)  # fmt: skip
def test_chosen_impl_runs(monkeypatch, kind, impl, decode_impl):
    """The layer runs exactly the forms it was given: its table rows are swapped for counting ones."""
    calls = []
    op = f"ttt_{kind}"

    def counted(form):
        def run(*args, **kwargs):
            calls.append(form.name)
            return form.load()(*args, **kwargs)

        return dataclasses.replace(form, fn=run)

    monkeypatch.setitem(forms._TABLES, op, [counted(f) for f in forms.forms_of(op)])
    layer = _layer(kind, impl=impl, decode_impl=decode_impl)
    _, state = layer(_x(1, 6))
    assert calls == [impl] and layer.last_impl == impl
    layer.step(_x(1, 1), state)
    assert calls == [impl, decode_impl] and layer.last_impl == decode_impl


def test_impl_is_validated():
    with pytest.raises(ValueError, match="impl must be one of"):
        TTTLinear(dim=16, num_heads=2, impl="fast")


@torch.no_grad()
def test_impls_agree_in_the_layer():
    x = _x(2, 10)
    y_chunk, _ = _layer("linear", impl="chunk")(x)
    y_ref, _ = _layer("linear", impl="reference")(x)
    torch.testing.assert_close(y_chunk, y_ref, atol=1e-10, rtol=0)


@torch.no_grad()
def test_mamba_variant_shares_qk_and_carries_conv_state():
    layer = _layer("mlp", share_qk=True, use_gate=True)
    assert layer.k_proj is None and layer.conv_q is not None and layer.g_proj is not None
    _, state = layer(_x(3, 5))
    assert isinstance(state, TTTLayerState) and state.conv_q.shape == (3, 16, 3) and state.position == 5
    assert state.nbytes() > 0 and bool(state.ttt.isfinite().all())


def test_non_causal_encoder_mode():
    layer = _layer("linear", causal=False)
    x = _x(1, 8)
    y, _ = layer(x)
    # non-causal: the first token of a mini-batch already sees the mini-batch's later tokens
    x2 = x.clone()
    x2[:, 3] += 1.0
    assert not torch.allclose(layer(x2)[0][:, 0], y[:, 0])
    with pytest.raises(ValueError, match="cannot decode"):
        layer.step(x[:, :1], layer.init_state(1))


@pytest.mark.parametrize("impl", ["chunk", "reference"])
@pytest.mark.parametrize("kind", sorted(LAYERS))
@pytest.mark.parametrize("lengths", [[48, 37, 20, 5], [45, 37, 20, 5]], ids=["T48", "T45"])
def test_non_causal_padded_batch_matches_each_row_alone(lengths, kind, impl):
    """Real lengths that are not multiples of b = 16: a row's last mini-batch reads the weights after its
    last real token, token_eta at that position included, as unpadded; forward and all gradients."""
    torch.manual_seed(0)
    layer = LAYERS[kind](dim=16, num_heads=2, mini_batch_size=16, causal=False, impl=impl,
                         share_qk=kind == "mlp", use_gate=kind == "mlp").double()  # fmt: skip
    with torch.no_grad():  # token_eta away from 1/(i+1), one position clamped at 0
        layer.token_eta_offset.uniform_(-0.05, 0.05)
        layer.token_eta_offset[3] = -1.0
    assert_padded_matches_rows(layer, _x(4, lengths[0]), lengths)


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_non_causal_padding_through_the_triton_kernels(monkeypatch, kind):
    """The same with impl="triton" in float32 (under Triton's interpreter without CUDA): the layer hands
    the fused kernels a plain non-causal call, so the fast path gives the unpadded result too."""
    pytest.importorskip("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    torch.manual_seed(0)
    layer = LAYERS[kind](dim=16, num_heads=2, mini_batch_size=16, causal=False, impl="triton").to(device)
    with torch.no_grad():
        layer.token_eta_offset.uniform_(-0.05, 0.05)
    assert_padded_matches_rows(layer, _x(3, 37).float().to(device), [37, 20, 5], atol=1e-5, rtol=1e-5)
    assert layer.last_impl == "triton"


def test_gradient_reaches_initial_weights_through_a_chunked_sequence():
    layer = _layer("linear")
    x = _x(2, 9)
    y1, state = layer(x[:, :5])
    y2, _ = layer(x[:, 5:], state)
    (y1.sum() + y2.square().sum()).backward()
    assert layer.W0.grad.abs().sum() > 0 and layer.token_eta_offset.grad.abs().sum() > 0


def test_float32_and_wrong_state():
    layer = TTTLinear(dim=16, num_heads=2)
    y, _ = layer(torch.randn(2, 20, 16))
    assert y.dtype == torch.float32 and torch.isfinite(y).all()
    with pytest.raises(TypeError, match="TTTLayerState"):
        layer(torch.randn(2, 3, 16), state=(1,))
    with pytest.raises(ValueError, match="even"):
        TTTLinear(dim=12, num_heads=4)


@torch.no_grad()
@settings(max_examples=15, deadline=None)
@given(length=st.integers(1, 30), cut=st.floats(0.0, 1.0), b=st.sampled_from([1, 3, 4]))
def test_any_split_point_and_mini_batch_size(length, cut, b):
    """Chunked calls resume at any offset, including mid-mini-batch, and match one call (RoPE mod b)."""
    torch.manual_seed(0)
    layer = TTTLinear(dim=16, num_heads=2, mini_batch_size=b).double()
    x = _x(1, length)
    split = int(cut * length)
    y, _ = layer(x)
    if split == 0:
        return
    y1, state = layer(x[:, :split])
    y2, _ = layer(x[:, split:], state) if split < length else (x[:, :0], None)
    torch.testing.assert_close(torch.cat([y1, y2], dim=1), y, atol=1e-10, rtol=0)


@pytest.mark.parametrize(("kind", "decode_form"), [("linear", "recurrent"), ("mlp", "chunk")])
def test_auto_impl_off_cuda(kind, decode_form):
    """The default impl="auto" off CUDA: the chunked dual form for sequences, the fallback decode form for
    one causal token (also what a float64 layer runs on CUDA, where the Triton kernels do not apply)."""
    layer = _layer(kind)
    assert (layer.impl, layer.decode_impl) == ("auto", "auto")
    _, state = layer(_x(1, 6))
    assert layer.last_impl == "chunk"
    layer.step(_x(1, 1), state)
    assert layer.last_impl == decode_form
    layer(_x(1, 1))  # a one-token forward is a decode step too
    assert layer.last_impl == decode_form
    noncausal = _layer(kind, causal=False)
    noncausal(_x(1, 8))
    assert noncausal.last_impl == "chunk"


@torch.no_grad()
@pytest.mark.parametrize("share_qk", [False, True])
@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_continuing_after_a_right_padded_prefill_is_exact(kind, share_qk):
    """Ragged rows in one padded call (7, 12, 0 and 4 real tokens, mini-batch 4): each row ends in its own
    state at its own offset, so forward and step continue every row exactly as its unpadded sequence
    (the padded row's state used to run on through the padding: logits off by ~1, silently)."""
    layer = _layer(kind, share_qk=share_qk)
    x, x2 = _x(4, 12), _x(4, 5, seed=2)
    lengths = [7, 12, 0, 4]
    mask = torch.arange(12)[None, :] < torch.tensor(lengths)[:, None]
    y, state = layer(x, mask=mask)
    assert state.ttt.offset == (3, 0, 0, 0)
    y2, state2 = layer(x2[:, :3], state)
    y3, _ = layer.step(x2[:, 3:4], state2)
    for row, n in enumerate(lengths):
        alone, st = layer(x[row : row + 1, :n]) if n else (y[row : row + 1, :0], None)
        alone2, st2 = layer(x2[row : row + 1, :3], st)
        alone3, _ = layer.step(x2[row : row + 1, 3:4], st2)
        for got, want in ((y[row, :n], alone[0]), (y2[row], alone2[0]), (y3[row], alone3[0])):
            torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_non_causal_state_padded_inside_a_mini_batch_is_refused(kind):
    """Non-causal rows are not packed: a state padded inside a mini-batch cannot be continued (it is not
    the unpadded row's); padding whole mini-batches after a boundary is exact and continues."""
    layer = _layer(kind, causal=False)
    x, x2 = _x(2, 12), _x(2, 4, seed=2)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 7:] = False
    _, state = layer(x, mask=mask)
    with pytest.raises(ValueError, match="comes from a call whose mask padded a row inside a mini-batch"):
        layer(x2, state)
    mask[1, 7] = True  # 8 real tokens: two whole mini-batches, T = 12
    _, state = layer(x, mask=mask)
    _, alone_state = layer(x[1:, :8])
    torch.testing.assert_close(layer(x2, state)[0][1:], layer(x2[1:], alone_state)[0], atol=1e-12, rtol=0)


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_padded_batch_gradients_are_those_of_each_row_alone(kind):
    """Training on a right-padded batch (rows packed inside the layer): the parameter gradients of the
    real tokens' loss equal the sum over rows run alone."""
    layer = _layer(kind)
    x, lengths = _x(3, 9), [9, 5, 2]
    mask = torch.arange(9)[None, :] < torch.tensor(lengths)[:, None]
    y, _ = layer(x, mask=mask)
    weights = torch.linspace(0.5, 1.5, 16, dtype=torch.float64)
    got = torch.autograd.grad((y[mask] * weights).sum(), list(layer.parameters()))
    want = [torch.zeros_like(p) for p in layer.parameters()]
    for row, n in enumerate(lengths):
        y_row, _ = layer(x[row : row + 1, :n])
        for w, g in zip(want, torch.autograd.grad((y_row * weights).sum(), list(layer.parameters()))):
            w += g
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=0)


@pytest.mark.parametrize("switch", ["use_gate", "share_qk", "causal", "rope", "learn_token_eta"])
def test_switches_must_be_booleans(switch):
    """A JSON "yes" or a 0 from --mixer-kwargs is refused, not read as a truth value."""
    for bad in ("yes", 0, None):
        with pytest.raises(TypeError, match=f"TTTLinear: {switch} must be True or False"):
            TTTLinear(dim=16, num_heads=2, **{switch: bad})
