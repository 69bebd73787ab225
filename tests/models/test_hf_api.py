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


def test_position_ids_of_one_document_per_row_are_taken():
    """Consecutive positions over each row's real tokens (what a tokenizer's padded batch gives with
    ``cumsum(mask) - 1``, or a plain arange) change nothing: the model counts positions itself."""
    model = hf_model()
    idx = torch.randint(0, 61, (2, 7), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    with torch.no_grad():
        want = model(idx, attention_mask=mask).logits
        positions = (mask.cumsum(1) - 1).masked_fill(mask == 0, 1)
        assert torch.equal(model(idx, attention_mask=mask, position_ids=positions).logits, want)
        plain = model(idx).logits
        assert torch.equal(model(idx, position_ids=torch.arange(7)[None].expand(2, 7)).logits, plain)
        assert torch.equal(model(idx, position_ids=torch.arange(7)).logits, plain)  # [T] broadcasts
        out = model(idx[:, :4])  # a continuation: positions carry on from the cache
        more = model(idx[:, 4:], cache=out.cache, position_ids=torch.arange(4, 7)[None].expand(2, 3))
        torch.testing.assert_close(more.logits, plain[:, 4:], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mixer", ["ttt_linear", "attention", "gated_deltanet"])
def test_packed_documents_run_apart(mixer):
    """position_ids restarting at 0 (transformers' DataCollatorWithFlattening) were accepted and ignored:
    the documents packed into a row ran as one sequence, each reading the others' state."""
    model = hf_model(mixer)
    gen = torch.Generator().manual_seed(3)
    docs = [torch.randint(0, 61, (n,), generator=gen) for n in (3, 5, 1, 4)]
    positions = torch.cat([torch.arange(len(d)) for d in docs] + [torch.zeros(0, dtype=torch.long)])
    # two rows: the first packs three documents, the second holds the fourth, right-padded
    idx = torch.stack([torch.cat(docs[:3]), torch.cat([docs[3], torch.zeros(5, dtype=torch.long)])])
    mask = torch.stack([torch.ones(9), torch.cat([torch.ones(4), torch.zeros(5)])]).long()
    pos = torch.stack([positions[:9], torch.cat([positions[9:], torch.ones(5, dtype=torch.long)])])
    with torch.no_grad():
        out = model(idx, attention_mask=mask, position_ids=pos, labels=idx.masked_fill(mask == 0, -100))
        assert out.cache is None
        alone = [model(d[None]).logits[0] for d in docs]
        got = [out.logits[0, :3], out.logits[0, 3:8], out.logits[0, 8:9], out.logits[1, :4]]
        for g, a in zip(got, alone):
            torch.testing.assert_close(g, a, rtol=1e-4, atol=1e-4)
        assert torch.equal(out.logits[1, 4:], torch.zeros(5, 61))
        # the loss: each document's next-token predictions, none across a boundary
        terms = [F.cross_entropy(a[:-1], d[1:], reduction="sum") for a, d in zip(alone, docs)]
        torch.testing.assert_close(out.loss, sum(terms) / sum(len(d) - 1 for d in docs), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="packed documents .* neither continue a cache nor leave one"):
        model(idx, attention_mask=mask, position_ids=pos, use_cache=True)


@pytest.mark.parametrize(
    "positions, match",
    [
        ([[0, 1, 2, 4, 5, 6, 7]], r"row 0 jumps at column 3 \(2 -> 4\)"),
        ([[0, 1, 2, 1, 2, 3, 4]], r"row 0 jumps at column 3 \(2 -> 1\)"),
        ([[0, 1, 2, 3, 4, 5]], r"position_ids must be \[B, T\] = \[1, 7\] or \[T\]"),
    ],
)
def test_position_ids_that_neither_continue_nor_restart_are_refused(positions, match):
    model = hf_model()
    idx = torch.randint(0, 61, (1, 7))
    with pytest.raises(ValueError, match=match):
        model(idx, position_ids=torch.tensor(positions))


def test_an_argument_forward_does_not_take_is_refused():
    """Any keyword went into **kwargs and was dropped without a word."""
    model = hf_model()
    idx = torch.randint(0, 61, (1, 5))
    with pytest.raises(TypeError, match=r"takes no argument 'token_type_ids': it takes input_ids"):
        model(idx, token_type_ids=torch.zeros_like(idx))
    assert model(idx, inputs_embeds=None, cache_position=torch.arange(5)).logits.shape == (1, 5, 61)


def test_a_flattening_collators_batch_trains_each_document_alone():
    """What ``DataCollatorWithFlattening`` gives (one row, positions restarting, labels -100 at each
    document's first token) goes straight into the model, and the loss is that of the documents apart."""
    from transformers import DataCollatorWithFlattening

    model = hf_model()
    docs = [[5, 9, 2, 7], [3, 3, 8], [1, 4, 4, 6, 2]]
    batch = DataCollatorWithFlattening(return_tensors="pt")([{"input_ids": d} for d in docs])
    with torch.no_grad():
        loss = model(**batch).loss
        alone = [model(torch.tensor([d]), labels=torch.tensor([d])).loss * (len(d) - 1) for d in docs]
    torch.testing.assert_close(loss, sum(alone) / sum(len(d) - 1 for d in docs), rtol=1e-4, atol=1e-5)


def test_activation_checkpointing_through_the_transformers_switch():
    """activation_checkpointing_enable() (the Trainer's activation_checkpointing=True) raised "does not
    support activation checkpointing": it now turns on CausalLM.checkpoint_blocks, with the same loss
    and gradients; what the model cannot honour (every_n_layers, a reentrant checkpoint, offloading) is
    refused."""
    idx = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(3))

    def loss_and_grads(model: TTTForCausalLM) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.train().zero_grad()
        loss = model(idx, labels=idx).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    model = hf_model()
    assert not model.is_activation_checkpointing
    plain = loss_and_grads(model)
    model.activation_checkpointing_enable()
    assert model.model.checkpoint_blocks and model.is_activation_checkpointing
    recomputed = loss_and_grads(model)
    torch.testing.assert_close(recomputed, plain)
    model.activation_checkpointing_disable()
    assert not model.model.checkpoint_blocks and not model.is_activation_checkpointing
    for kwargs, match in [
        ({"every_n_layers": 2}, "every_n_layers"),
        ({"activation_checkpointing_kwargs": {"use_reentrant": True}}, "use_reentrant"),
        ({"activation_checkpointing_kwargs": {"use_reentrant": None}}, "use_reentrant"),  # torch's default
        ({"activation_checkpointing_kwargs": {"preserve_rng_state": False}}, "preserve_rng_state"),
        ({"offload": True}, "offload"),
    ]:
        with pytest.raises(ValueError, match=match):
            model.activation_checkpointing_enable(**kwargs)
        assert not model.model.checkpoint_blocks
