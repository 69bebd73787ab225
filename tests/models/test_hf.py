"""The transformers adapter: generate() with a constant-size cache, Auto* registration, safetensors."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from ttt.models.hf import TTTCache, TTTForCausalLM, TTTLMConfig  # noqa: E402


def hf_model(mixer: str = "ttt_linear", **mixer_kwargs) -> TTTForCausalLM:
    torch.manual_seed(0)
    kwargs = {"mixer_kwargs": {mixer: mixer_kwargs}} if mixer_kwargs else {}
    return TTTForCausalLM(TTTLMConfig(preset="micro", mixer=mixer, vocab_size=61, **kwargs)).eval()


@pytest.mark.parametrize(
    "mixer, kwargs", [("ttt_linear", {}), ("attention", {}), ("attention", {"conv_size": 4})]
)
def test_generate_matches_native_greedy_decoding(mixer, kwargs):
    model = hf_model(mixer, **kwargs)
    idx = torch.randint(0, 61, (2, 19), generator=torch.Generator().manual_seed(1))
    out = model.generate(idx, max_new_tokens=7, do_sample=False)
    assert torch.equal(out, model.model.generate(idx, 7, temperature=0))
    sampled = model.generate(idx, max_new_tokens=4, do_sample=True, top_k=5)
    assert sampled.shape == (2, 23)


def test_generate_uses_a_constant_size_cache():
    model = hf_model("ttt_linear")
    seen: list[tuple[int, int]] = []
    original = model.forward

    def recording_forward(*args, **kwargs):
        out = original(*args, **kwargs)
        ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        seen.append((ids.shape[1], out.cache.nbytes()))
        return out

    model.forward = recording_forward
    model.generate(torch.randint(0, 61, (1, 33)), max_new_tokens=20, do_sample=False)
    # one prefill call over the whole prompt, then one token per call; the state never grows (at a
    # mini-batch boundary it is smaller: no partial-mini-batch gradient sum is held)
    assert seen[0][0] == 33 and all(n == 1 for n, _ in seen[1:]) and len(seen) == 20
    assert max(b for _, b in seen) == seen[0][1] == seen[-1][1]
    assert isinstance(model(torch.zeros(1, 3, dtype=torch.long)).cache, TTTCache)


def test_save_pretrained_and_auto_classes(tmp_path):
    model = hf_model()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert AutoConfig.from_pretrained(tmp_path).model_type == "ttt_lm"
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(again, TTTForCausalLM)
    idx = torch.randint(0, 61, (2, 17))
    with torch.no_grad():
        assert torch.equal(again(idx).logits, model(idx).logits)
    assert again.model.head.weight is again.model.embed.weight


def test_loss_with_labels_and_padding_rules():
    """``labels`` are the input ids (the HF convention): the model shifts them, so the loss is the mean
    negative log-likelihood of token t + 1 given tokens <= t over the labels that are not -100."""
    model = hf_model().eval()
    idx = torch.randint(0, 61, (2, 12))
    labels = idx.clone()
    labels[1, 7:] = -100
    with torch.no_grad():
        out = model(idx, labels=labels)
    assert out.loss is not None and out.loss.ndim == 0
    logp = torch.log_softmax(out.logits.double(), dim=-1)
    nll = [-logp[b, t, labels[b, t + 1]] for b in range(2) for t in range(11) if labels[b, t + 1] != -100]
    assert len(nll) == 11 + 6
    torch.testing.assert_close(out.loss.double(), torch.stack(nll).mean(), rtol=1e-5, atol=1e-6)
    unshifted = [-logp[b, t, labels[b, t]] for b in range(2) for t in range(12) if labels[b, t] != -100]
    assert not torch.allclose(out.loss.double(), torch.stack(unshifted).mean(), atol=1e-3)
    left_padded = torch.tensor([[0, 1, 1], [1, 1, 1]])  # accepted since the stranger review
    assert model(idx[:, :3], attention_mask=left_padded).logits.shape == (2, 3, 61)


def test_from_ttt_checkpoint(tmp_path):
    from ttt.models import CausalLM, LMConfig
    from ttt.models.checkpoint import save_checkpoint

    torch.manual_seed(0)
    config = LMConfig.from_name("micro", mixer="ttt_mlp", vocab_size=61)
    native = CausalLM(config).eval()
    save_checkpoint(tmp_path, step=1, model_state=native.state_dict(), config=config)
    hf = TTTForCausalLM.from_checkpoint(str(tmp_path)).eval()
    idx = torch.randint(0, 61, (1, 21))
    with torch.no_grad():
        assert torch.equal(hf(idx).logits, native(idx)[0])
