"""The transformers adapter with padded prompts (right or left): generate continues every row as if it ran
alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from ttt.models.hf import TTTForCausalLM, TTTLMConfig  # noqa: E402


@pytest.mark.parametrize("mixer", ["ttt_linear", "ttt_mlp", "attention", "deltanet"])
def test_right_padded_generate_continues_each_prompt_exactly(mixer):
    """Rows of 11, 6 and 3 real tokens: greedy tokens equal each prompt's alone (the TTT rows' states
    used to run on through the padding, and generate read the logits of a padded column)."""
    torch.manual_seed(0)
    model = TTTForCausalLM(TTTLMConfig(preset="micro", mixer=mixer, vocab_size=61)).eval()
    lengths = [11, 6, 3]
    ids = torch.randint(1, 61, (3, 11), generator=torch.Generator().manual_seed(1))
    mask = (torch.arange(11)[None, :] < torch.tensor(lengths)[:, None]).long()
    ids = ids * mask
    out = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    for row, n in enumerate(lengths):
        alone = model.generate(ids[row : row + 1, :n], max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert out[row, 11:].tolist() == alone[0, n:].tolist()


def test_a_row_without_a_real_token_is_refused():
    """An attention_mask row of zeros (an empty prompt) was generated from: the model read the logits of
    the row's last column, padding (stranger review)."""
    torch.manual_seed(0)
    model = TTTForCausalLM(TTTLMConfig(preset="micro", mixer="ttt_linear", vocab_size=61)).eval()
    ids = torch.randint(1, 61, (2, 5))
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0]])
    with pytest.raises(ValueError, match=r"attention_mask row 1 holds no token \(an empty prompt\)"):
        model(ids, attention_mask=mask)


def _padded(lengths: list[int], width: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(1, 61, (len(lengths), width), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(width)[None, :]
    n = torch.tensor(lengths)[:, None]
    mask = (pos >= width - n) if left else (pos < n)
    return ids * mask, mask.long()


@pytest.mark.parametrize("mixer", ["ttt_linear", "ttt_mlp", "attention", "deltanet", "swa"])
@pytest.mark.parametrize("use_cache", [True, False])
def test_left_padded_generate_continues_each_prompt_exactly(mixer, use_cache):
    """Left padding is what transformers' generate expects and what pipeline() makes for a batch; it was
    refused (pipeline(prompts, batch_size=2) failed), and so was use_cache=False after right padding
    (the mask then has a hole). Every row's real tokens now run as one sequence from its first."""
    torch.manual_seed(0)
    model = TTTForCausalLM(TTTLMConfig(preset="micro", mixer=mixer, vocab_size=61)).eval()
    lengths = [11, 6, 3]
    for left in (True, False):
        ids, mask = _padded(lengths, 11, left)
        out = model.generate(
            ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0, use_cache=use_cache
        )
        for row, n in enumerate(lengths):
            real = ids[row, 11 - n :] if left else ids[row, :n]
            alone = model.generate(real[None], max_new_tokens=5, do_sample=False, pad_token_id=0)
            assert out[row, 11:].tolist() == alone[0, n:].tolist(), (left, row)


def test_left_padded_logits_and_loss_equal_each_row_alone():
    torch.manual_seed(0)
    model = TTTForCausalLM(TTTLMConfig(preset="micro", mixer="ttt_linear", vocab_size=61)).eval()
    ids, mask = _padded([9, 4], 9, left=True)
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, labels=labels)
        alone = [model(ids[0:1]).logits[0], model(ids[1:2, 5:]).logits[0]]
        torch.testing.assert_close(out.logits[0], alone[0])
        torch.testing.assert_close(out.logits[1, 5:], alone[1])
        nll = torch.cat(
            [F.cross_entropy(a[:-1], r[-len(a) + 1 :], reduction="none") for a, r in zip(alone, ids)]
        )
        torch.testing.assert_close(out.loss, nll.mean())


def test_batched_pipeline_equals_one_prompt_at_a_time():
    """transformers' text-generation pipeline pads a batch on the left."""
    from transformers import pipeline

    from ttt.data import ByteTokenizer
    from ttt.models import CausalLM, LMConfig

    torch.manual_seed(0)
    hf = TTTForCausalLM.from_ttt(CausalLM(LMConfig.from_name("micro", mixer="ttt_linear")), ByteTokenizer())
    hf.tokenizer.pad_token = hf.tokenizer.convert_ids_to_tokens(0)
    generator = pipeline("text-generation", model=hf, tokenizer=hf.tokenizer)
    prompts = ["ROMEO: what", "JU", "a b c"]
    batched = generator(prompts, max_new_tokens=6, do_sample=False, batch_size=3)
    alone = [generator(p, max_new_tokens=6, do_sample=False) for p in prompts]
    assert [b[0]["generated_text"] for b in batched] == [a[0]["generated_text"] for a in alone]


def test_padding_while_decoding_is_refused():
    torch.manual_seed(0)
    model = TTTForCausalLM(TTTLMConfig(preset="micro", mixer="ttt_linear", vocab_size=61)).eval()
    ids = torch.randint(1, 61, (2, 5))
    cache = model(ids).cache
    with pytest.raises(ValueError, match="no padding while decoding"):
        model(ids[:, :2], past_key_values=cache, attention_mask=torch.tensor([[1] * 7, [1] * 6 + [0]]))


def test_an_attention_mask_of_another_shape_is_refused():
    """Gathering the rows by the mask would otherwise drop rows or columns of input_ids silently."""
    torch.manual_seed(0)
    model = TTTForCausalLM(TTTLMConfig(preset="micro", mixer="ttt_linear", vocab_size=61)).eval()
    ids = torch.randint(1, 61, (3, 6))
    mask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    for bad in (mask[:2], mask[:, :4], mask[0], torch.cat([mask, mask], 1)):
        with pytest.raises(ValueError, match=r"attention_mask must be \[B, T\] = \[3, 6\] like input_ids"):
            model(ids, attention_mask=bad)
    cache = model(ids).cache
    full = torch.ones(3, 8, dtype=torch.long)
    assert model(ids[:, :2], past_key_values=cache, attention_mask=full).logits.shape == (3, 2, 61)
    with pytest.raises(ValueError, match=r"or \[B, tokens seen \+ T\] = \[3, 8\]"):
        model(ids[:, :2], past_key_values=cache, attention_mask=full[:, :5])
