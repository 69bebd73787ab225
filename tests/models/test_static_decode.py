"""Preallocated, in-place decoding (ttt.models.static_decode, attention's StaticKVCache) == the normal
decode: logits step by step on CPU (no CUDA graph); the graph-captured step on CUDA (gpu)."""

from __future__ import annotations

import contextlib
import dataclasses
from unittest import mock

import pytest
import torch

import ttt.models.static_decode as sd
from ttt.layers import MIXERS, Attention
from ttt.layers.attention import attention_decode_step_, static_kv_cache
from ttt.models import CausalLM, LMConfig
from ttt.models.static_decode import StaticDecoder


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"num_kv_heads": 2}, {"window": 4}, {"window": 3, "num_kv_heads": 1}, {"conv_size": 4, "num_kv_heads": 2},
     {"window": 4, "conv_size": 3}, {"window": 4, "sink": 2}, {"window": 3, "sink": 9, "num_kv_heads": 1}],
    ids=str,
)  # fmt: skip
def test_attention_static_cache_equals_step(kwargs):
    torch.manual_seed(0)
    layer = Attention(32, 4, **kwargs)
    x = torch.randn(2, 15, 32)
    with torch.no_grad():
        _, cache = layer(x[:, :6])
        static = static_kv_cache(layer, cache, max_len=15)
        for t in range(6, 15):
            want, cache = layer.step(x[:, t : t + 1], cache)
            got = attention_decode_step_(layer, x[:, t : t + 1], static)
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert int(static.position) == 15
    # full attention: 15 rounded up to 16; a window: its sink tokens, then its ring
    assert static.k.shape[2] == kwargs.get("window", 16) + kwargs.get("sink", 0)


def test_static_cache_refuses_padding():
    layer = Attention(16, 2)
    with torch.no_grad():
        _, cache = layer(torch.randn(2, 4, 16), mask=torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]).bool())
    with pytest.raises(ValueError, match="padding or rows of different lengths"):
        static_kv_cache(layer, cache, max_len=8)


CASES = {
    "attention": {},
    "swa": {"mixer_kwargs": {"swa": {"window": 5}}},
    "attention_conv": {"mixer_kwargs": {"attention": {"conv_size": 4}}},
    "ttt_linear": {},
    "ttt_mlp": {},
    "ttt_linear_share_qk": {"mixer_kwargs": {"ttt_linear": {"share_qk": True, "use_gate": True}}},
    "gated_deltanet": {},
    "windowed": {"mixer_kwargs": {"windowed": {"window": 5}}},  # TTT-Linear inside: a window and a TTT slot
    "windowed_gdn": {"mixer_kwargs": {"windowed": {"window": 5, "sink": 2, "inner": "gated_deltanet"}}},
}


def _model(case: str) -> CausalLM:
    torch.manual_seed(0)
    mixer = {
        "ttt_linear_share_qk": "ttt_linear",
        "attention_conv": "attention",
        "windowed_gdn": "windowed",
    }.get(case, case)
    config = LMConfig.from_name("micro", mixer=mixer, max_seq_len=64, **CASES[case])
    return CausalLM(config).eval()


def _compare(model: CausalLM, prompt_len: int = 7, steps: int = 12) -> StaticDecoder:
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 256, (2, prompt_len + steps), generator=g)
    dec = StaticDecoder(model, max_len=prompt_len + steps + 1)
    with torch.no_grad():
        want, state = model(idx[:, :prompt_len])
        got = dec.prefill(idx[:, :prompt_len])
        torch.testing.assert_close(got, want[:, -1])
        for t in range(prompt_len, prompt_len + steps):  # teacher-forced tokens: covers every position
            want, state = model.step(idx[:, t], state)
            got = dec.step(idx[:, t])
            torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5, msg=lambda m, t=t: f"token {t}: {m}")
    assert dec.length == prompt_len + steps
    return dec


@pytest.mark.parametrize("case", list(CASES))
def test_static_decoder_equals_model_step(case, monkeypatch):
    # the TTT layers use the layer's own single-token form here (the Triton path: the next test)
    monkeypatch.setattr(sd, "_triton_decode", lambda layer, device: None)
    dec = _compare(_model(case))
    assert dec.state_nbytes() > 0
    # TTT's step can be captured only with its in-place kernels; every other mixer's can
    assert dec.graphable == (not case.startswith("ttt") and case != "windowed")


def _to_meta(obj):
    """``obj`` with every tensor (in dataclasses, tuples, lists) replaced by a ``meta`` tensor."""
    if isinstance(obj, torch.Tensor):
        return obj.to("meta")
    if dataclasses.is_dataclass(obj):
        return dataclasses.replace(
            obj, **{f.name: _to_meta(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        )
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to_meta(o) for o in obj)
    return obj


def _slot_to_meta(slot) -> None:
    for name, value in vars(slot).items():
        if name == "layer":
            continue
        if hasattr(value, "buffers") and hasattr(value, "step"):  # a nested slot (the windowed mixer's)
            _slot_to_meta(value)
        else:
            setattr(slot, name, _to_meta(value))


# the windowed mixer's default inner mixer is TTT-Linear (graphable with its Triton kernel only): it runs
# here with Gated DeltaNet inside
NOT_TTT = [m for m in MIXERS if m not in ("ttt_linear", "ttt_mlp", "windowed")] + ["windowed:gated_deltanet"]


@pytest.mark.parametrize("mixer", sorted(NOT_TTT))
def test_a_graphable_decode_step_reads_no_value_on_the_host(mixer):
    """A CUDA graph cannot hold a host read (``.item()``, ``bool(tensor)``, a data-dependent shape). On the
    ``meta`` device every such read raises, so a whole-model decode step that runs there reads none: what a
    capture needs, checked without a GPU. The gate checks of the family ops skip themselves while a graph
    is captured (``capturing``); the TTT slots are graphable only with their Triton kernels (the GPU test)."""
    torch.manual_seed(0)
    mixer, _, inner = mixer.partition(":")
    kwargs = {mixer: {"inner": inner, "window": 4}} if inner else {}
    model = CausalLM(LMConfig.from_name("micro", mixer=mixer, max_seq_len=32, mixer_kwargs=kwargs)).eval()
    dec = StaticDecoder(model, max_len=16)
    with torch.no_grad():
        dec.prefill(torch.randint(0, 256, (2, 5)))
    assert dec.graphable
    model.to("meta")
    for slot in dec.slots:
        _slot_to_meta(slot)
    dec.token, dec.logits = dec.token.to("meta"), dec.logits.to("meta")
    no_autocast = lambda *a, **k: contextlib.nullcontext()  # noqa: E731  (autocast knows no meta device)
    with (
        mock.patch("ttt.ops._checks.capturing", return_value=True),
        mock.patch("torch.autocast", no_autocast),
    ):
        with torch.no_grad():
            dec._step()
    assert dec.logits.device.type == "meta"


@pytest.mark.parametrize("case", ["ttt_linear", "ttt_mlp"])
def test_static_decoder_ttt_in_place_kernels(case):
    """The fused in-place decode kernels (under the Triton interpreter on CPU) step the buffers."""
    if not torch.cuda.is_available():
        pytest.importorskip("triton")
        import os

        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    dec = _compare(_model(case), prompt_len=13, steps=6)  # crosses a mini-batch boundary (b = 16)
    assert all(s.decode_ is not None for s in dec.slots)


def test_static_decoder_errors():
    model = _model("attention")
    with pytest.raises(ValueError, match="max_len"):
        StaticDecoder(model, max_len=65)
    dec = StaticDecoder(model, max_len=4)
    with pytest.raises(RuntimeError, match="before prefill"):
        dec.step(torch.tensor([1]))
    with pytest.raises(ValueError, match="no room"):
        dec.prefill(torch.zeros(1, 4, dtype=torch.long))
    dec.prefill(torch.zeros(1, 3, dtype=torch.long))
    dec.step(torch.tensor([1]))
    with pytest.raises(ValueError, match="reached max_len"):
        dec.step(torch.tensor([1]))
    with pytest.raises(ValueError, match="cuda_graph=True needs CUDA"):
        StaticDecoder(model, max_len=8, cuda_graph=True).prefill(torch.zeros(1, 3, dtype=torch.long))


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(CASES))
def test_cuda_graph_decoder_equals_model_step(case):
    model = _model(case).cuda()
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 256, (2, 30), generator=g).cuda()
    dec = StaticDecoder(model, max_len=31, cuda_graph=True)
    with torch.no_grad():
        want, state = model(idx[:, :9])
        dec.prefill(idx[:, :9])
        for t in range(9, 30):
            want, state = model.step(idx[:, t], state)
            got = dec.step(idx[:, t])
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert dec._graph is not None


def test_step_refuses_tokens_that_do_not_fit_the_batch():
    """A [1] token for a batch of 2 was broadcast to every row, and float ids were truncated to
    integers, both silently (the step copies the token into its buffer)."""
    torch.manual_seed(0)
    model = CausalLM(LMConfig.from_name("micro", mixer="ttt_linear", vocab_size=61)).eval()
    dec = StaticDecoder(model, max_len=12)
    dec.prefill(torch.randint(0, 61, (2, 5)))
    for bad in (torch.tensor([1]), torch.tensor([1, 2, 3]), torch.tensor([[1, 2], [3, 4]]), torch.tensor(1)):
        with pytest.raises(ValueError, match=r"token must be \[B\] or \[B, 1\] token ids with B = 2"):
            dec.step(bad)
    with pytest.raises(ValueError, match="token must hold integer ids, got torch.float32"):
        dec.step(torch.tensor([1.7, 2.2]))
    assert dec.length == 5  # nothing was fed
    assert dec.step(torch.tensor([[1], [2]])).shape == (2, 61) and dec.length == 6


@pytest.mark.parametrize("max_len", [10.5, True, "10"])
def test_max_len_must_be_an_int(max_len):
    model = CausalLM(LMConfig.from_name("micro", mixer="attention", vocab_size=61)).eval()
    with pytest.raises(TypeError, match="max_len must be an int"):
        StaticDecoder(model, max_len=max_len)


def test_the_decoding_docs_example_runs_and_prints_what_it_says(capsys):
    """docs/decoding.md's example was a fragment (model, prompt, prompt_len, new_tokens undefined) that
    asked for a CUDA graph, which raises on the CPU."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "decoding.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 1
    exec(compile(blocks[0], "docs/decoding.md", "exec"), {"__name__": "__decoding_md__"})
    assert capsys.readouterr().out == "27 True\n"
