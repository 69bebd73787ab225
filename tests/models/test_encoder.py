"""The bidirectional encoder: every token sees the whole sequence, padding is ignored, it trains."""

from __future__ import annotations

import pytest
import torch

from ttt.models.encoder import EncoderClassifier, EncoderConfig
from ttt.recipes.digits import DigitsArgs, train_digits


@pytest.mark.parametrize(
    ("mixer", "mixer_kwargs"),
    [("ttt_linear", {}), ("ttt_linear", {"causal": False}), ("attention", {})],
    ids=["ttt_linear", "ttt_linear-non-causal", "attention"],
)
def test_encoder_is_bidirectional_and_padding_invariant(mixer, mixer_kwargs):
    """20 real tokens of 24: with causal=False the last mini-batch (b = 16) is partly padded."""
    torch.manual_seed(0)
    config = EncoderConfig(mixer=mixer, mixer_kwargs=mixer_kwargs, dim=32, n_heads=2, n_layers=1, max_len=24)
    model = EncoderClassifier(config).eval()
    idx = torch.randint(0, 17, (2, 20))
    with torch.no_grad():
        base = model(idx)
        changed_last = idx.clone()
        changed_last[:, -1] = (changed_last[:, -1] + 1) % 17
        # the pooled output depends on the last token through the reversed pass
        assert base.shape == (2, 10) and not torch.allclose(base, model(changed_last))
        padded = torch.cat([idx, torch.zeros(2, 4, dtype=torch.long)], dim=1)
        mask = torch.arange(24)[None, :] < 20
        torch.testing.assert_close(model(padded, mask.expand(2, 24)), base, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="max_len"):
        model(torch.zeros(1, 25, dtype=torch.long))


def test_digits_recipe_smoke():
    r = train_digits(DigitsArgs(epochs=1, limit=64, dim=32, n_layers=1))
    assert 0.0 <= r.test_accuracy <= 1.0 and r.num_params > 0 and r.train_loss > 0
