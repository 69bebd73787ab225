"""The parts of the transformers model API that the adapter must honour or refuse: resizing the
vocabulary, the Trainer's loss normalisation, and outputs it does not produce (stranger review)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM  # noqa: E402

from ttt.models.hf import TTTForCausalLM, TTTLMConfig  # noqa: E402


def hf_model(mixer: str = "ttt_linear", **kwargs) -> TTTForCausalLM:
    torch.manual_seed(0)
    return TTTForCausalLM(TTTLMConfig(preset="micro", mixer=mixer, vocab_size=61, **kwargs)).eval()


@pytest.mark.parametrize("tie", [True, False])
def test_resize_token_embeddings(tmp_path, tie):
    """resize_token_embeddings raised NotImplementedError (set_input_embeddings was not implemented)."""
    model = hf_model(tie_embeddings=tie)
    idx = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(idx).logits
    model.resize_token_embeddings(70)
    assert model.config.vocab_size == 70 and model.model.config.vocab_size == 70
    assert (model.model.head.weight is model.model.embed.weight) == tie
    with torch.no_grad():
        after = model(idx).logits
        assert after.shape == (2, 9, 70)
        assert torch.equal(after[..., :61], before)  # the old tokens' rows are kept
        assert model(torch.tensor([[65, 69]])).logits.shape == (1, 2, 70)  # a new id is accepted
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(again(idx).logits, after)
    model.resize_token_embeddings(50)  # shrinking: the ids it drops are refused
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 50\)"):
        model(torch.tensor([[55]]))


def test_loss_honours_num_items_in_batch():
    """transformers' Trainer sees **kwargs in forward, passes num_items_in_batch and then no longer
    divides the loss by the gradient-accumulation steps: the model must return sum / num_items_in_batch
    (it returned the mean, so accumulating k micro-batches gave k times the gradient)."""
    model = hf_model()
    idx = torch.randint(0, 61, (2, 12))
    labels = idx.clone()
    labels[1, 5:] = -100
    with torch.no_grad():
        out = model(idx, labels=labels, num_items_in_batch=40)
        shifted = labels[:, 1:]
        total = F.cross_entropy(out.logits[:, :-1].reshape(-1, 61), shifted.reshape(-1), reduction="sum")
        torch.testing.assert_close(out.loss, total / 40)
        mean = model(idx, labels=labels).loss
        torch.testing.assert_close(mean, total / (shifted != -100).sum())


@pytest.mark.parametrize(
    "kwarg, match",
    [("output_hidden_states", "returns no hidden states"), ("output_attentions", "no attention weights")],
)
def test_outputs_the_model_does_not_produce_are_refused(kwarg, match):
    """They were accepted and dropped: ``.hidden_states`` then raised AttributeError, and so did
    generate(..., output_hidden_states=True, return_dict_in_generate=True) after decoding."""
    model = hf_model()
    idx = torch.randint(0, 61, (1, 5))
    with pytest.raises(ValueError, match=match):
        model(idx, **{kwarg: True})
    with pytest.raises(ValueError, match=match):
        model.generate(idx, max_new_tokens=2, do_sample=False, return_dict_in_generate=True, **{kwarg: True})
    assert model(idx, **{kwarg: False}).logits.shape == (1, 5, 61)


def test_the_tokenizers_special_tokens_reach_generate(tmp_path):
    """A model converted from a GGUF teacher carries its tokenizer's end-of-text token, but the config and
    generation_config named none, so generate() and pipeline() ran past it to max_new_tokens."""
    pytest.importorskip("gguf")
    from ttt.models.llama import load_llama
    from ttt.testing import tiny_llama, write_llama_gguf

    llama = tiny_llama(tmp_path / "llama", n_layers=1)
    write_llama_gguf(llama, tmp_path / "llama" / "tokenizer.json", tmp_path / "m.gguf")
    model, tokenizer = load_llama(tmp_path / "m.gguf")
    assert tokenizer.special == {"eos": "<|endoftext|>"}
    hf = TTTForCausalLM.from_ttt(model, tokenizer=tokenizer)
    assert hf.config.eos_token_id == hf.generation_config.eos_token_id == 0
    hf.save_pretrained(tmp_path / "hf")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert again.config.eos_token_id == again.generation_config.eos_token_id == 0
    # generation ends at the token: make it the most likely one after any input

    def eos_first(module, inputs, logits):
        return logits + 100 * (torch.arange(logits.shape[-1]) == 0)

    again.model.head.register_forward_hook(eos_first)
    out = again.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=10, do_sample=False)
    assert out.tolist() == [[5, 6, 7, 0]]


def test_a_cache_of_another_kind_is_refused():
    """A transformers DynamicCache (or anything but the TTTCache a call returned) raised AttributeError."""
    from transformers import DynamicCache

    model = hf_model()
    idx = torch.randint(0, 61, (1, 5))
    for kwargs in ({"past_key_values": DynamicCache()}, {"cache": (1, 2)}):
        with pytest.raises(TypeError, match=r"the cache must be the TTTCache .* got (DynamicCache|tuple)"):
            model(idx, **kwargs)
    with pytest.raises(TypeError, match=r"the cache must be the TTTCache .* got DynamicCache"):
        model.generate(idx, max_new_tokens=2, do_sample=False, past_key_values=DynamicCache())
