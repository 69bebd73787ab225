"""The KV-binding mixer (``ttt.layers.KVBinding``): the parallel form == the TTT recurrence, forward and all
gradients in float64 for each ablation switch; the switches that break the parallel form run the
recurrence; bad switches; inside ``CausalLM`` and ``ttt train``. The protocol invariances (step == forward,
split == whole, padding, batch) run in test_protocol.py over ``mixer_cases.CASES``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ttt.layers import MIXERS, KVBinding
from ttt.layers.protocol import merge_heads, split_heads

DIM, HEADS = 16, 2

# T = 13 with chunk_size 4: three full chunks and a partial one
VARIANTS = {
    "baseline": {},
    "ascent": dict(ascent=True),
    "q_from_k": dict(q_from_k=True),
    "inner_steps": dict(inner_steps=3),
    "momentum": dict(momentum=0.7),
    "constant_lr": dict(token_lr=False),
    "wide": dict(hidden_mult=2, momentum=0.3, ascent=True),
}


def _x(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, length, DIM, generator=gen, dtype=torch.float64)


def _pair(**kwargs) -> tuple[KVBinding, KVBinding]:
    torch.manual_seed(0)
    par = KVBinding(dim=DIM, num_heads=HEADS, impl="parallel", chunk_size=4, **kwargs).double()
    rec = KVBinding(dim=DIM, num_heads=HEADS, impl="recurrent", chunk_size=4, **kwargs).double()
    rec.load_state_dict(par.state_dict())
    return par, rec


def _grads(layer: KVBinding, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    x = x.clone().requires_grad_()
    y, _ = layer(x)
    # a fixed random cotangent: every output element counts with its own weight
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=y.dtype)
    (y * w).sum().backward()
    return y.detach(), {"x": x.grad, **{n: p.grad for n, p in layer.named_parameters()}}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_parallel_equals_recurrent_forward_and_all_gradients(variant):
    par, rec = _pair(**VARIANTS[variant])
    x = _x(2, 13)
    y_par, g_par = _grads(par, x)
    y_rec, g_rec = _grads(rec, x)
    assert (par.last_impl, rec.last_impl) == ("parallel", "recurrent")
    torch.testing.assert_close(y_par, y_rec, atol=1e-12, rtol=0)
    assert set(g_par) == set(g_rec) and all(g is not None for g in g_par.values())
    for name in g_par:
        scale = g_rec[name].abs().max().clamp_min(1.0)
        torch.testing.assert_close(g_par[name] / scale, g_rec[name] / scale, atol=1e-11, rtol=0, msg=name)


def test_linear_inner_model_is_linear_attention_from_w1():
    """inner='linear': o_t = q_t (W1 + sum_{i <= t} lr_i k_i^T v_i) (+ momentum), against a token loop."""
    torch.manual_seed(0)
    layer = KVBinding(dim=DIM, num_heads=HEADS, inner="linear", momentum=0.5, chunk_size=4).double()
    x = _x(2, 13)
    y, _ = layer(x)
    with torch.no_grad():
        k = F.normalize(split_heads(layer.k_proj(x), HEADS), dim=-1)
        q = F.normalize(split_heads(layer.q_proj(x), HEADS), dim=-1)
        v = split_heads(layer.v_proj(x), HEADS)
        lr = layer._inner_lr(x, None, torch.float64)
        W = layer.W1.expand(2, *layer.W1.shape).clone()
        V = torch.zeros_like(W)
        outs = []
        for t in range(x.shape[1]):
            V = 0.5 * V + lr[:, :, t, None, None] * k[:, :, t, :, None] * v[:, :, t, None, :]
            W = W + V
            outs.append(torch.einsum("bhd,bhde->bhe", q[:, :, t], W))
        want = layer.o_proj(merge_heads(layer.o_norm(torch.stack(outs, dim=2))))
    torch.testing.assert_close(y, want, atol=1e-12, rtol=0)


@pytest.mark.parametrize("kwargs", [dict(update_all=True), dict(weight_norm=True)])
def test_switches_that_break_the_parallel_form_run_the_recurrence(kwargs):
    torch.manual_seed(0)
    layer = KVBinding(dim=DIM, num_heads=HEADS, **kwargs).double()
    assert (layer.impl, layer.decode_impl) == ("recurrent", "recurrent")
    x = _x(2, 9)
    x.requires_grad_()
    y, state = layer(x)
    assert layer.last_impl == "recurrent" and not state.final
    y.square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())
    # it differs from the last-layer-only layer with the same weights (the switch acts)
    plain = KVBinding(dim=DIM, num_heads=HEADS).double()
    plain.load_state_dict(layer.state_dict())
    assert (plain(x)[0] - y).abs().max() > 1e-6
    with pytest.raises(ValueError, match="parallel form"):
        KVBinding(dim=DIM, num_heads=HEADS, impl="parallel", **kwargs)


@torch.no_grad()
def test_recurrent_form_is_batch_invariant_and_ignores_padding():
    torch.manual_seed(0)
    layer = KVBinding(dim=DIM, num_heads=HEADS, update_all=True, weight_norm=True, momentum=0.5).double()
    x = _x(3, 11)
    y, _ = layer(x)
    lengths = [11, 4, 7]
    mask = torch.arange(11)[None, :] < torch.tensor(lengths)[:, None]
    y_pad, _ = layer(torch.where(mask[..., None], x, torch.full_like(x, 1e3)), mask=mask)
    for row, n in enumerate(lengths):
        torch.testing.assert_close(layer(x[row : row + 1])[0], y[row : row + 1], atol=1e-12, rtol=0)
        torch.testing.assert_close(y_pad[row : row + 1, :n], y[row : row + 1, :n], atol=1e-12, rtol=0)


@torch.no_grad()
def test_a_recurrent_state_cannot_be_continued():
    torch.manual_seed(0)
    layer = KVBinding(dim=DIM, num_heads=HEADS, update_all=True).double()
    x = _x(1, 5)
    _, state = layer(x)
    with pytest.raises(ValueError, match="'recurrent' form, which returns no fast weights"):
        layer(x, state)
    with pytest.raises(ValueError, match="decoding needs the parallel form") as err:
        layer.step(x[:, :1], layer.init_state(1))
    assert "\n" not in str(err.value)
    par = KVBinding(dim=DIM, num_heads=HEADS, impl="recurrent", decode_impl="parallel").double()
    _, state = par(x)
    with pytest.raises(ValueError, match="'recurrent' form, which returns no fast weights"):
        par.step(x[:, :1], state)
    par = KVBinding(dim=DIM, num_heads=HEADS).double()
    _, state = par(x)  # a parallel state, continued by the recurrent form: it starts from W1 only
    par.impl = "recurrent"
    with pytest.raises(ValueError, match="pass state=None"):
        par(x, state)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(inner="mlp"), "inner must be one of"),
        (dict(update_all="yes"), "update_all must be True or False"),
        (dict(q_from_k=1), "q_from_k must be True or False"),
        (dict(inner_steps=0), "inner_steps must be a positive int"),
        (dict(inner_steps=2.0), "inner_steps must be a positive int"),
        (dict(hidden_mult=0), "hidden_mult must be a positive int"),
        (dict(momentum=1.0), r"momentum must be a finite number in \[0, 1\)"),
        (dict(base_lr=0.0), "base_lr must be a number > 0"),
        (dict(impl="fast"), "impl must be one of"),
        (dict(update_all=True, impl="parallel"), "break.* the parallel form"),
        (dict(weight_norm=True, decode_impl="parallel"), "decode_impl must be 'recurrent' or 'auto'"),
        (dict(inner="linear", update_all=True), "inner='linear' is linear attention itself"),
        (dict(inner="linear", impl="recurrent"), "only the parallel form"),
        (dict(dim=15), "divisible by num_heads"),
    ],
)
def test_bad_switches_raise_one_line(kwargs, match):
    kwargs = {"dim": DIM, "num_heads": HEADS, **kwargs}
    with pytest.raises(ValueError, match=match) as err:
        KVBinding(**kwargs)
    assert "\n" not in str(err.value)


def test_builds_inside_causal_lm_with_every_form():
    from ttt.models import CausalLM, LMConfig

    assert MIXERS["kv_binding"] is KVBinding
    idx = torch.randint(0, 61, (2, 17), generator=torch.Generator().manual_seed(0))
    kw = {"update_all": True, "weight_norm": True, "q_from_k": True}
    torch.manual_seed(0)
    model = CausalLM(
        LMConfig.from_name("micro", mixer="kv_binding", vocab_size=61, mixer_kwargs={"kv_binding": kw})
    )
    logits, states = model(idx)
    assert logits.shape == (2, 17, 61) and all(b.mixer.last_impl == "recurrent" for b in model.blocks)
    assert all(not s.final for s in states)
    # the same model's two forms, side by side (what the evidence recipe times)
    torch.manual_seed(0)
    model = CausalLM(LMConfig.from_name("micro", mixer="kv_binding", vocab_size=61))
    with torch.no_grad():
        par, _ = model(idx)
        for block in model.blocks:
            block.mixer.impl = "recurrent"
        rec, _ = model(idx)
    torch.testing.assert_close(par, rec, atol=1e-5, rtol=1e-5)


def test_ttt_train_runs_two_steps(corpus_dir, tmp_path):
    from ttt.cli.main import main

    run = tmp_path / "run"
    argv = ["train", "--mixer", "kv_binding", "--preset", "micro", "--corpus", corpus_dir, "--steps", "2",
            "--batch-size", "2", "--context", "16", "--eval-every", "2", "--eval-batches", "1",
            "--out", str(run), "--no-progress",
            "--mixer-kwargs", '{"kv_binding": {"update_all": true, "momentum": 0.5}}']  # fmt: skip
    assert main(argv) == 0
    assert (run / "result.json").exists()


@torch.no_grad()
@pytest.mark.parametrize("kwargs", [{}, dict(update_all=True, weight_norm=True, momentum=0.5)])
def test_gradient_ascent_is_descent_with_the_values_negated(kwargs):
    """Ascent on -<f(k), v> is descent on -<f(k), -v> and the read never sees v: negating v_proj turns one
    layer into the other exactly, with all layers trained too (so the ascent row is a reparametrisation)."""
    torch.manual_seed(0)
    descent = KVBinding(dim=DIM, num_heads=HEADS, **kwargs).double()
    ascent = KVBinding(dim=DIM, num_heads=HEADS, ascent=True, **kwargs).double()
    ascent.load_state_dict(descent.state_dict())
    ascent.v_proj.weight.neg_()
    x = _x(2, 9)
    torch.testing.assert_close(ascent(x)[0], descent(x)[0], atol=1e-12, rtol=0)
