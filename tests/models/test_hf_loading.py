"""``from_pretrained`` trusts nothing it reads: every model tensor comes from the file or the load fails.

transformers 5 builds the model on the ``meta`` device and fills what the file does not hold through
``_init_weights``; ``TTTForCausalLM`` initialises itself at construction instead, so whatever the file
lacked stayed uninitialised memory (stranger review)."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from ttt.layers import MIXERS  # noqa: E402
from ttt.models.hf import TTTForCausalLM, TTTLMConfig  # noqa: E402


def hf_model(mixer: str = "ttt_linear", **kwargs) -> TTTForCausalLM:
    torch.manual_seed(0)
    return TTTForCausalLM(TTTLMConfig(preset="micro", mixer=mixer, vocab_size=61, **kwargs)).eval()


@pytest.mark.parametrize("mixer", sorted(MIXERS))
def test_save_then_load_gives_the_same_logits_for_every_mixer(tmp_path, mixer):
    """RetNet kept its decay rates in a buffer that is not saved: after from_pretrained it held
    uninitialised memory (gamma ~ 1: no decay) and the logits differed, silently. No layer holds such a
    buffer now (a value it needs is saved or computed where it is used)."""
    kwargs = (
        {"mixer_kwargs": {"windowed": {"inner": "ttt_linear", "window": 8}}} if mixer == "windowed" else {}
    )
    model = hf_model(mixer, **kwargs)
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    idx = torch.randint(0, 61, (2, 21), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(again(idx).logits, model(idx).logits)
    for (name, a), (_, b) in zip(model.named_buffers(), again.named_buffers()):
        assert torch.equal(a, b), name
    unsaved = {n for n, b in model.named_buffers() if b.numel()} - set(model.state_dict())
    assert not unsaved, f"buffers with values that from_pretrained leaves uninitialised: {sorted(unsaved)}"


def _edit_weights(path, edit) -> None:
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_a_missing_tensor_is_refused(tmp_path):
    """A tensor missing from model.safetensors was 'newly initialised' by transformers with our no-op
    _init_weights: uninitialised memory, used without an error when it happened to be finite."""
    hf_model().save_pretrained(tmp_path)
    _edit_weights(tmp_path, lambda t: t.pop("model.blocks.0.mlp.down_proj.weight"))
    for load in (AutoModelForCausalLM.from_pretrained, TTTForCausalLM.from_pretrained):
        with pytest.raises(
            ValueError, match=r"model\.safetensors does not fit .*missing: model\.blocks\.0\.mlp"
        ):
            load(tmp_path)


def test_an_unexpected_tensor_is_refused(tmp_path):
    hf_model().save_pretrained(tmp_path)
    _edit_weights(tmp_path, lambda t: t.update({"model.bogus": torch.zeros(3)}))
    with pytest.raises(ValueError, match=r"does not fit .*unexpected: model\.bogus"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_non_finite_weights_are_refused(tmp_path):
    """As ttt's own loader does; a NaN surfaced only at the first forward, as an error about the inner lr."""
    hf_model().save_pretrained(tmp_path)
    _edit_weights(tmp_path, lambda t: t["model.norm.weight"].fill_(float("nan")))
    with pytest.raises(ValueError, match=r"model\.safetensors holds NaN or Inf: model\.norm\.weight"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_an_untied_head_round_trips(tmp_path):
    model = hf_model("attention", tie_embeddings=False)
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert again.model.head.weight is not again.model.embed.weight
    assert torch.equal(again.model.head.weight, model.model.head.weight)


def test_ignore_mismatched_sizes_cannot_leave_uninitialised_weights(tmp_path):
    hf_model().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["mlp_hidden"] = 96
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"does not fit .*other shapes: model\.blocks\.0\.mlp"):
        TTTForCausalLM.from_pretrained(tmp_path, ignore_mismatched_sizes=True)


def test_a_directory_without_config_json_is_refused(tmp_path):
    """Without config.json transformers built the default config (the 125m-like LMConfig defaults) and
    loaded whatever tensors matched; a ttt checkpoint directory is named as one."""
    from ttt.models import CausalLM, LMConfig
    from ttt.models.checkpoint import save_checkpoint

    config = LMConfig.from_name("micro", mixer="ttt_linear", vocab_size=61)
    save_checkpoint(tmp_path / "run", step=1, model_state=CausalLM(config).state_dict(), config=config)
    for where in (tmp_path / "run", tmp_path / "run" / "step-000001"):
        with pytest.raises(ValueError, match=r"a ttt checkpoint.*TTTForCausalLM\.from_checkpoint"):
            TTTForCausalLM.from_pretrained(where)
    hf_model().save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "config.json").unlink()
    with pytest.raises(ValueError, match=r"holds no config\.json"):
        TTTForCausalLM.from_pretrained(tmp_path / "hf")


def test_another_libraries_directory_is_refused(tmp_path):
    """A Llama directory was loaded into a TTT model of the default shape after a logged warning."""
    from ttt.testing import tiny_llama

    tiny_llama(tmp_path)
    with pytest.raises(ValueError, match=r"model_type 'llama', not 'ttt_lm'"):
        TTTForCausalLM.from_pretrained(tmp_path)
