"""HuggingFace ``transformers`` adapter for :class:`ttt.models.CausalLM` (``pip install 'ttt[hf]'``).

``TTTForCausalLM`` is a ``PreTrainedModel`` that inherits ``GenerationMixin`` explicitly (the official
ttt-lm-pytorch model lost ``generate()`` when transformers >= 4.50 stopped adding the mixin implicitly),
registers with ``AutoConfig`` / ``AutoModelForCausalLM`` under ``model_type = "ttt_lm"``, and keeps its
decoding state in a :class:`TTTCache`: the per-block states of the mixers, which for TTT and the
linear-attention family have a size independent of the sequence length. ``generate()`` prefills the
prompt with one chunked call and then feeds one token per step; the cache is on by default (the official
model defaulted to ``use_cache=False`` and re-ran the whole prefix at every step).

Importing this module imports ``transformers``; ``import ttt.models`` alone does not.

Example::

    from ttt.models.hf import TTTForCausalLM, TTTLMConfig
    model = TTTForCausalLM(TTTLMConfig(preset="micro", mixer="ttt_linear"))
    out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=5, do_sample=False)
    model.save_pretrained("my-ttt")                     # config.json + model.safetensors
    again = AutoModelForCausalLM.from_pretrained("my-ttt")
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

from .config import LMConfig
from .lm import CausalLM, state_nbytes

__all__ = ["TTTCache", "TTTCausalLMOutput", "TTTForCausalLM", "TTTLMConfig"]


class TTTLMConfig(PretrainedConfig):
    """A ``PretrainedConfig`` wrapping :class:`LMConfig`.

    Args:
        preset: start from ``LMConfig.from_name(preset)``; ``None`` starts from the ``LMConfig`` defaults.
        **kwargs: ``LMConfig`` fields (``mixer``, ``dim``, ...) override the preset; anything else goes to
            ``PretrainedConfig``.
    """

    model_type = "ttt_lm"

    def __init__(self, preset: str | None = None, **kwargs: Any) -> None:
        names = {f.name for f in dataclasses.fields(LMConfig)}
        lm_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
        lm = LMConfig.from_name(preset, **lm_kwargs) if preset else LMConfig(**lm_kwargs)
        for k, v in lm.to_dict().items():
            setattr(self, k, v)
        self.preset = preset
        # the names transformers reads
        self.hidden_size, self.num_hidden_layers, self.num_attention_heads = lm.dim, lm.n_layers, lm.n_heads
        self.max_position_embeddings = lm.max_seq_len
        # the decoding cache is constant-size, so it is on by default (ttt-lm-pytorch had it off)
        self.use_cache = kwargs.pop("use_cache", True)
        kwargs.setdefault("tie_word_embeddings", lm.tie_embeddings)
        super().__init__(**kwargs)

    def to_lm_config(self) -> LMConfig:
        return LMConfig.from_dict({f.name: getattr(self, f.name) for f in dataclasses.fields(LMConfig)})


class TTTCache:
    """Decoding state of :class:`TTTForCausalLM`: one state per block plus the tokens seen.

    Not a ``transformers.Cache`` subclass on purpose: it holds fast weights, not keys and values, and
    its size does not grow with the sequence (except for attention blocks in a hybrid).
    """

    is_compileable = False

    def __init__(self, states: list[Any], seen_tokens: int) -> None:
        self.states, self.seen_tokens = states, seen_tokens

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def nbytes(self) -> int:
        return state_nbytes(self.states)

    def reorder_cache(self, beam_idx: Tensor) -> None:
        raise NotImplementedError("beam search over TTT states is not supported; use greedy or sampling")


@dataclass
class TTTCausalLMOutput(ModelOutput):
    """``loss`` (with labels), ``logits [B, T, V]`` float32, and the ``cache`` to continue from."""

    loss: Tensor | None = None
    logits: Tensor | None = None
    cache: TTTCache | None = None


class TTTForCausalLM(PreTrainedModel, GenerationMixin):
    """:class:`CausalLM` behind the ``transformers`` model API (``generate``, ``save_pretrained``, Auto*)."""

    config_class = TTTLMConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _tied_weights_keys = {"model.head.weight": "model.embed.weight"}
    _supports_cache_class = False
    _is_stateful = True

    def __init__(self, config: TTTLMConfig) -> None:
        super().__init__(config)
        self.model = CausalLM(config.to_lm_config())
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # the model brings its own cache; transformers must not create a DynamicCache
        return False

    def _init_weights(self, module: torch.nn.Module) -> None:
        # CausalLM and the mixers initialise themselves
        return

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.embed

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.model.head

    @classmethod
    def from_ttt(cls, model: CausalLM) -> TTTForCausalLM:
        """Wrap a trained :class:`CausalLM` (weights are copied)."""
        config = TTTLMConfig(**model.config.to_dict())
        hf = cls(config)
        hf.model.load_state_dict(model.state_dict())
        return hf

    @classmethod
    def from_checkpoint(cls, path: str) -> TTTForCausalLM:
        """Load a ``ttt train`` checkpoint (run directory or step directory)."""
        from .checkpoint import load_model

        model, _ = load_model(path)
        return cls.from_ttt(model)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        cache: TTTCache | None = None,
        past_key_values: TTTCache | None = None,
        labels: Tensor | None = None,
        use_cache: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> TTTCausalLMOutput:
        """``input_ids [B, T]`` -> logits ``[B, T, V]``; with a cache, continue the cached sequences.

        ``attention_mask`` must be right padding (1 = token): left-padded batches are refused, since
        TTT's mini-batches are aligned to the start of each sequence. After a right-padded prompt the
        state of every row continues from its last real token, and a padded row's last column holds the
        logits of that token, so ``generate`` continues each prompt as if alone (the new tokens sit after
        the padding in the returned ids).
        """
        cache = cache if cache is not None else past_key_values
        mask = None
        if attention_mask is not None:
            mask = attention_mask[:, -input_ids.shape[1] :].bool()
            if bool(mask.all()):
                mask = None
            elif cache is not None or bool((mask[:, 1:] & ~mask[:, :-1]).any()):
                raise ValueError("TTTForCausalLM supports right padding only (no left padding, no padding "
                                 "while decoding): for prompts of different lengths use the CausalLM "
                                 "underneath, model.model.generate(ids, n, lengths=...)")  # fmt: skip
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if cache is None:
            logits, states = self.model(input_ids, mask=mask)
            seen = 0
            if mask is not None:  # a padded row's last column answers as its last real token: generate
                last = logits[torch.arange(len(mask)), mask.sum(1) - 1]  # continues each prompt exactly
                logits = torch.cat([logits[:, :-1], last[:, None]], dim=1)
        elif input_ids.shape[1] == 1:
            logits, states = self.model.step(input_ids[:, 0], cache.states)
            logits, seen = logits[:, None], cache.seen_tokens
        else:
            logits, states = self.model(input_ids, state=cache.states)
            seen = cache.seen_tokens
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)  # fmt: skip
        new_cache = TTTCache(states, seen + input_ids.shape[1]) if use_cache else None
        return TTTCausalLMOutput(loss=loss, logits=logits, cache=new_cache)

    def prepare_inputs_for_generation(
        self,
        input_ids: Tensor,
        cache: TTTCache | None = None,
        past_key_values: TTTCache | None = None,
        attention_mask: Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """First call: the whole prompt (chunked prefill). Later calls: only the newest token."""
        cache = cache if cache is not None else past_key_values
        if cache is not None:
            input_ids = input_ids[:, cache.seen_tokens :]
            attention_mask = None
        return {"input_ids": input_ids, "cache": cache, "attention_mask": attention_mask,
                "use_cache": True if use_cache is None else use_cache}  # fmt: skip

    def _update_model_kwargs_for_generation(self, outputs: ModelOutput, model_kwargs: dict[str, Any],
                                            is_encoder_decoder: bool = False, num_new_tokens: int = 1,
                                            **kwargs: Any) -> dict[str, Any]:  # fmt: skip
        model_kwargs["cache"] = outputs.cache
        model_kwargs.pop("past_key_values", None)
        if (mask := model_kwargs.get("attention_mask")) is not None:
            ones = mask.new_ones(mask.shape[0], num_new_tokens)
            model_kwargs["attention_mask"] = torch.cat([mask, ones], dim=-1)
        return model_kwargs


AutoConfig.register("ttt_lm", TTTLMConfig, exist_ok=True)
AutoModelForCausalLM.register(TTTLMConfig, TTTForCausalLM, exist_ok=True)
