"""The transformers adapter with right-padded prompts: generate continues every row as if it ran alone."""

from __future__ import annotations

import pytest
import torch

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
