"""HuggingFace ``transformers`` adapter for :class:`ttt.models.CausalLM` (``pip install 'ttt[hf]'``).

``TTTForCausalLM`` is a ``PreTrainedModel`` that inherits ``GenerationMixin`` explicitly (the official
ttt-lm-pytorch model lost ``generate()`` when transformers >= 4.50 stopped adding the mixin implicitly),
registers with ``AutoConfig`` / ``AutoModelForCausalLM`` under ``model_type = "ttt_lm"``, and keeps its
decoding state in a :class:`TTTCache`: the per-block states of the mixers, which for TTT and the
linear-attention family have a size independent of the sequence length. ``generate()`` prefills the
prompt with one chunked call and then feeds one token per step; the cache is on by default (the official
model defaulted to ``use_cache=False`` and re-ran the whole prefix at every step).

Importing this module imports ``transformers``; ``import ttt.models`` alone does not.

A model made from a ``ttt`` checkpoint (:meth:`TTTForCausalLM.from_checkpoint`) or from a
:class:`CausalLM` with its tokenizer (:meth:`TTTForCausalLM.from_ttt`) carries that tokenizer as a
``PreTrainedTokenizerFast`` and ``save_pretrained`` writes it too, so ``AutoTokenizer`` and
``pipeline("text-generation")`` load the directory.

Example::

    import torch
    from transformers import AutoModelForCausalLM
    from ttt.models.hf import TTTForCausalLM, TTTLMConfig
    model = TTTForCausalLM(TTTLMConfig(preset="micro", mixer="ttt_linear"))
    out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=5, do_sample=False)
    model.save_pretrained("my-ttt")                     # config.json + model.safetensors
    again = AutoModelForCausalLM.from_pretrained("my-ttt")
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

from .config import LMConfig
from .lm import CausalLM, state_nbytes

__all__ = ["TTTCache", "TTTCausalLMOutput", "TTTForCausalLM", "TTTLMConfig", "hf_tokenizer"]


def hf_tokenizer(tokenizer: Any) -> Any:
    """A ``transformers.PreTrainedTokenizerFast`` giving the same ids as a ``ttt`` tokenizer (bytes or BPE).

    The byte tokenizer becomes a byte-level BPE without merges whose id of each byte is the byte's value.
    Special tokens a BPE tokenizer read from a GGUF file names (bos / eos / unknown / padding) are kept.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from ttt.data.tokenizer import BPETokenizer, ByteTokenizer

    if isinstance(tokenizer, ByteTokenizer):
        # ByteLevel's printable stand-ins for the 256 bytes (GPT-2's bytes_to_unicode), ranked by byte
        chars = sorted(pre_tokenizers.ByteLevel.alphabet(), key=_gpt2_byte_of)
        tok = Tokenizer(models.BPE(vocab={c: _gpt2_byte_of(c) for c in chars}, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
        return PreTrainedTokenizerFast(tokenizer_object=tok)
    if isinstance(tokenizer, BPETokenizer):
        special = getattr(tokenizer, "special", {})
        names = {"bos": "bos_token", "eos": "eos_token", "unknown": "unk_token", "padding": "pad_token"}
        return PreTrainedTokenizerFast(
            tokenizer_object=tokenizer._tok, **{names[k]: v for k, v in special.items() if k in names}
        )
    raise TypeError(f"cannot turn a {type(tokenizer).__name__} into a transformers tokenizer")


def _gpt2_byte_of(char: str) -> int:
    """The byte that GPT-2's ``bytes_to_unicode`` maps to ``char``."""
    code = ord(char)
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]


_TTT_CKPT_FILES = ("checkpoint.json", "latest")  # what a ttt run or checkpoint directory holds


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

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, **kwargs: Any) -> Any:
        """``PretrainedConfig.from_pretrained`` that refuses what is not a ``ttt_lm`` config: a directory
        without config.json (transformers would build the default config) or another model type's."""
        where = pretrained_model_name_or_path
        config_dict, _ = cls.get_config_dict(where, **dict(kwargs))
        if not config_dict:
            if os.path.isdir(where) and any(os.path.exists(os.path.join(where, n)) for n in _TTT_CKPT_FILES):
                raise ValueError(
                    f"{where} is a ttt checkpoint directory, not a HF one: load it with "
                    f"TTTForCausalLM.from_checkpoint({str(where)!r})"
                )
            raise ValueError(f"{where} holds no config.json: expected a directory that save_pretrained wrote")
        if config_dict.get("model_type") != cls.model_type:
            raise ValueError(
                f"{where}: config.json has model_type {config_dict.get('model_type')!r}, not "
                f"{cls.model_type!r}: TTTForCausalLM loads only what a TTTForCausalLM saved"
            )
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)


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


def _the_cache(cache: Any, past_key_values: Any) -> TTTCache | None:
    """``cache``, else ``past_key_values``: None or the :class:`TTTCache` a call returned."""
    cache = cache if cache is not None else past_key_values
    if cache is not None and not isinstance(cache, TTTCache):
        raise TypeError(
            "the cache must be the TTTCache a previous call returned (output.cache), got "
            f"{type(cache).__name__}"
        )
    return cache


def _refuse_outputs(kwargs: dict[str, Any]) -> None:
    """One-line errors for outputs the model does not produce, asked for in ``kwargs``."""
    if kwargs.get("output_hidden_states"):
        raise ValueError(
            "TTTForCausalLM returns no hidden states (output_hidden_states=True): it returns logits and the "
            "cache; leave output_hidden_states off"
        )
    if kwargs.get("output_attentions"):
        raise ValueError(
            "TTTForCausalLM has no attention weights to return (output_attentions=True): leave "
            "output_attentions off"
        )


#: keywords ``forward`` takes besides its named arguments; any other is refused (it used to be dropped)
_FORWARD_EXTRAS = ("num_items_in_batch", "position_ids", "cache_position", "output_hidden_states",
                   "output_attentions")  # fmt: skip


def _check_keywords(kwargs: dict[str, Any], length: int, seen: int) -> None:
    """One-line errors for what ``forward`` would otherwise drop from its ``**kwargs``: an unknown keyword
    (unless None), and a ``cache_position`` other than the ``length`` tokens after the ``seen`` cached."""
    for key, value in kwargs.items():
        if key not in _FORWARD_EXTRAS and value is not None:
            raise TypeError(
                f"TTTForCausalLM.forward takes no argument {key!r}: it takes input_ids, attention_mask, "
                f"cache / past_key_values, labels, use_cache, return_dict, {', '.join(_FORWARD_EXTRAS)}"
            )
    if (where := kwargs.get("cache_position")) is not None:
        if not torch.equal(torch.as_tensor(where).cpu(), torch.arange(seen, seen + length)):
            raise ValueError(f"cache_position must be arange({seen}, {seen + length}): the tokens follow the "
                             f"{seen} the cache holds")  # fmt: skip


def _document_starts(positions: Any, input_ids: Tensor, mask: Tensor | None) -> Tensor | None:
    """Where packed documents start, from ``position_ids`` (``[B, T]`` or ``[T]``), which must go up by
    one or restart at 0 over a row's real tokens (``mask [B, T]`` bool, or None: all real). Returns None
    when every row holds one document (the model counts positions itself), else ``[B, T]`` bool: True at
    each document's first token (transformers' packing collators restart the positions at 0 there)."""
    batch, length = input_ids.shape
    positions = torch.as_tensor(positions).to(input_ids.device)
    if positions.dim() == 1 and positions.shape[0] == length:
        positions = positions[None].expand(batch, length)
    if positions.shape != (batch, length):
        raise ValueError(f"position_ids must be [B, T] = [{batch}, {length}] or [T] like input_ids, got "
                         f"{list(positions.shape)}")  # fmt: skip
    real = torch.ones_like(positions, dtype=torch.bool) if mask is None else mask
    starts = torch.zeros_like(real)
    for row in range(batch):
        cols = real[row].nonzero()[:, 0]
        pos = positions[row, cols]
        step = pos[1:] - pos[:-1]
        restart = pos[1:] == 0
        if len(bad := ((step != 1) & ~restart).nonzero()):
            col = int(cols[int(bad[0]) + 1])
            raise ValueError(
                f"position_ids row {row} jumps at column {col} ({int(pos[int(bad[0])])} -> "
                f"{int(positions[row, col])}): within a row they go up by one, or restart at 0 where a "
                "packed document begins"
            )
        starts[row, cols[0]] = True
        starts[row, cols[1:][restart]] = True
    return starts if bool((starts.sum(1) > 1).any()) else None


class TTTForCausalLM(PreTrainedModel, GenerationMixin):
    """:class:`CausalLM` behind the ``transformers`` model API (``generate``, ``save_pretrained``, Auto*)."""

    config_class = TTTLMConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _tied_weights_keys = {"model.head.weight": "model.embed.weight"}
    _supports_cache_class = False
    _is_stateful = True
    supports_gradient_checkpointing = True  # activation_checkpointing_enable(): CausalLM.checkpoint_blocks

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

    @property
    def gradient_checkpointing(self) -> bool:
        """Whether each block is recomputed in the backward (``CausalLM.checkpoint_blocks``); what
        transformers' ``is_activation_checkpointing`` reads."""
        return self.model.checkpoint_blocks

    def _set_gradient_checkpointing(
        self, enable: bool = True, gradient_checkpointing_func: Any = checkpoint, every_n_layers: int = 1
    ) -> None:
        """Where ``activation_checkpointing_enable`` / ``_disable`` land: the switch of
        :class:`CausalLM`, which recomputes every block with ``torch.utils.checkpoint(use_reentrant=False)``.
        Anything else it is asked for (``every_n_layers`` > 1, other checkpoint arguments, ``offload``)
        is refused rather than ignored."""
        if enable:
            if every_n_layers != 1:
                raise ValueError(
                    f"TTTForCausalLM recomputes every block: every_n_layers must be 1, got {every_n_layers}"
                )
            func = gradient_checkpointing_func
            partial = isinstance(func, functools.partial)
            inner, keywords = (func.func, func.keywords) if partial else (func, {})
            if inner is not checkpoint:
                raise ValueError(
                    "TTTForCausalLM recomputes blocks with torch.utils.checkpoint itself: offload=True and "
                    f"other checkpoint functions are not supported, got {getattr(inner, '__name__', inner)!r}"
                )
            if keywords.get("use_reentrant", False) is not False or set(keywords) - {"use_reentrant"}:
                raise ValueError(
                    "TTTForCausalLM's checkpoint takes activation_checkpointing_kwargs "
                    f"{{'use_reentrant': False}} only, got {keywords}"
                )
        self.model.checkpoint_blocks = enable

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.embed

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.model.head

    def set_input_embeddings(self, value: torch.nn.Module) -> None:
        """For ``resize_token_embeddings``: the new embedding, and the vocabulary size the model checks ids
        against."""
        self.model.embed = value
        self.model.config = dataclasses.replace(self.model.config, vocab_size=value.num_embeddings)

    def set_output_embeddings(self, value: torch.nn.Module) -> None:
        self.model.head = value

    @classmethod
    def from_ttt(
        cls, model: CausalLM, tokenizer: Any = None, trained_on: dict[str, Any] | None = None
    ) -> TTTForCausalLM:
        """Wrap a trained :class:`CausalLM` (weights are copied); a ``ttt`` tokenizer given here is
        written by ``save_pretrained`` (as ``tokenizer.json`` + ``tokenizer_config.json``) and the ids of the
        bos / eos / padding tokens it names go into the config and generation config. ``trained_on``
        (``{"corpus": ..., "context": ...}`` of the run) goes into the config as ``ttt_trained_on``: ``ttt
        eval`` and ``ttt generate`` default to them. Eval mode."""
        config = TTTLMConfig(**model.config.to_dict())
        if trained_on:
            config.ttt_trained_on = {
                "corpus": str(trained_on["corpus"]),
                "context": int(trained_on["context"]),
            }
        hf = cls(config)
        hf.model.load_state_dict(model.state_dict())
        hf.tokenizer = hf_tokenizer(tokenizer) if tokenizer is not None else None
        # the tokens the tokenizer names (a GGUF teacher's end of text): generate stops at its eos
        for name in ("bos", "eos", "pad"):
            token_id = None if hf.tokenizer is None else getattr(hf.tokenizer, f"{name}_token_id")
            if token_id is not None:
                setattr(hf.config, f"{name}_token_id", token_id)
                setattr(hf.generation_config, f"{name}_token_id", token_id)
        return hf.eval()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *model_args: Any, **kwargs: Any) -> Any:
        """``PreTrainedModel.from_pretrained``, strict: every tensor of the model comes from the file.

        transformers builds the model on the ``meta`` device and leaves to ``_init_weights`` whatever the
        file lacks; this model initialises itself at construction instead, so a missing, unexpected or
        resized tensor is an error here (the layers hold no unsaved buffer with values to compute again)."""
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(
            pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs
        )
        problems = []
        for what, keys in (("missing", info.get("missing_keys", ())),
                           ("unexpected", info.get("unexpected_keys", ())),
                           ("other shapes", [k if isinstance(k, str) else k[0]
                                             for k in info.get("mismatched_keys", ())])):  # fmt: skip
            if keys:
                names = sorted(keys)
                more = f" and {len(names) - 3} more" if len(names) > 3 else ""
                problems.append(f"{what}: {', '.join(names[:3])}{more}")
        if problems:
            raise ValueError(
                f"{pretrained_model_name_or_path}: model.safetensors does not fit the model of its "
                f"config.json ({'; '.join(problems)})"
            )
        bad = [n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
        if bad:
            raise ValueError(
                f"{pretrained_model_name_or_path}: model.safetensors holds NaN or Inf: {', '.join(bad[:3])}"
            )
        # the directory's tokenizer rides along, so save_pretrained writes a directory ttt eval can read
        if os.path.isfile(os.path.join(str(pretrained_model_name_or_path), "tokenizer.json")):
            from transformers import PreTrainedTokenizerFast

            model.tokenizer = PreTrainedTokenizerFast.from_pretrained(str(pretrained_model_name_or_path))
        return (model, info) if want_info else model

    @classmethod
    def from_checkpoint(cls, path: str) -> TTTForCausalLM:
        """Load a ``ttt train`` / ``ttt convert`` checkpoint (run or step directory) with its tokenizer,
        in eval mode."""
        from ttt.data.tokenizer import tokenizer_from_dict

        from .checkpoint import load_model

        model, meta = load_model(path)
        tokenizer = tokenizer_from_dict(meta["tokenizer"]) if "tokenizer" in meta else None
        run = meta.get("args", {})
        trained_on = {"corpus": run["corpus"], "context": run["context"]} if "context" in run else None
        return cls.from_ttt(model, tokenizer, trained_on=trained_on)

    def save_pretrained(self, save_directory: Any, *args: Any, **kwargs: Any) -> None:
        """``PreTrainedModel.save_pretrained``, plus the tokenizer files when the model carries one."""
        super().save_pretrained(save_directory, *args, **kwargs)
        if getattr(self, "tokenizer", None) is not None:
            self.tokenizer.save_pretrained(save_directory)

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

        ``attention_mask`` (1 = token) may pad a prompt on either side: each row's real tokens run as one
        sequence from its first, so its state continues from its last real token, and a row whose last
        column is padding holds the logits of that token there; ``generate`` thus continues each prompt as
        if alone (the new tokens sit after the padding in the returned ids). Tokens fed with a cache
        may not be padding. ``position_ids`` are checked, not used, while they go up by one over each row's
        real tokens; where they restart at 0 a packed document begins (transformers'
        ``DataCollatorWithFlattening``): each document then runs as its own sequence, a document's last
        token predicts nothing in the loss, and no cache is taken or returned.
        """
        _refuse_outputs(kwargs)
        cache = _the_cache(cache, past_key_values)
        mask = None
        if attention_mask is not None:
            (batch, length), seen_before = input_ids.shape, 0 if cache is None else cache.seen_tokens
            if (
                attention_mask.dim() != 2
                or attention_mask.shape[0] != batch
                or attention_mask.shape[1] not in (length, seen_before + length)
            ):
                also = f" or [B, tokens seen + T] = [{batch}, {seen_before + length}]" if seen_before else ""
                raise ValueError(
                    f"attention_mask must be [B, T] = [{batch}, {length}]{also} like input_ids, "
                    f"got {list(attention_mask.shape)}"
                )
            mask = attention_mask[:, -length:].bool()
            if cache is None and len(empty := (~mask.any(1)).nonzero()):  # a prompt: no row may be empty
                raise ValueError(
                    f"attention_mask row {int(empty[0])} holds no token (an empty prompt): every row needs "
                    "at least one real token"
                )
            if bool(mask.all()):
                mask = None
            elif cache is not None:
                raise ValueError("TTTForCausalLM takes no padding while decoding (attention_mask zeros among "
                                 "the tokens fed with a cache): pad the prompt instead")  # fmt: skip
        _check_keywords(kwargs, input_ids.shape[1], 0 if cache is None else cache.seen_tokens)
        positions = kwargs.get("position_ids")
        starts = None if positions is None else _document_starts(positions, input_ids, mask)
        if starts is not None and (cache is not None or use_cache):
            raise ValueError(
                "packed documents (position_ids restarting at 0 within a row) neither continue a cache nor "
                "leave one: pass no cache and use_cache=False"
            )
        use_cache = self.config.use_cache if use_cache is None and starts is None else bool(use_cache)
        if starts is not None:
            seen = 0
            logits, states = self._documents_apart(input_ids, mask, starts)
        elif cache is None:
            seen = 0
            if mask is None:
                logits, states = self.model(input_ids)
            else:  # one document per row, from its first real token
                rows = torch.arange(len(mask), device=mask.device)
                first = torch.zeros_like(mask)
                first[rows, mask.to(torch.int8).argmax(1)] = True
                logits, states = self._documents_apart(input_ids, mask, first)
                # a row padded at the end answers there as its last real token: generate reads that column
                last = mask.shape[1] - 1 - mask.flip(1).to(torch.int8).argmax(1)
                logits[:, -1] = logits[rows, last]
        elif input_ids.shape[1] == 1:
            logits, states = self.model.step(input_ids[:, 0], cache.states)
            logits, seen = logits[:, None], cache.seen_tokens
        else:
            logits, states = self.model(input_ids, state=cache.states)
            seen = cache.seen_tokens
        loss = None
        if labels is not None:
            # transformers' Trainer passes num_items_in_batch (the labelled tokens of all accumulated
            # micro-batches) and then leaves the loss unscaled: the sum over it, as its own models return
            n_items = kwargs.get("num_items_in_batch")
            reduction = "mean" if n_items is None else "sum"
            targets = labels[:, 1:]
            if mask is not None and cache is None:  # a padding column predicts nothing (left padding)
                targets = targets.masked_fill(~mask[:, :-1], -100)
            if starts is not None:  # nor does a document's last token predict the next one's first
                targets = targets.masked_fill(starts[:, 1:], -100)
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                   ignore_index=-100, reduction=reduction)  # fmt: skip
            if n_items is not None:
                loss = loss / (n_items.to(loss.device) if isinstance(n_items, Tensor) else n_items)
        new_cache = TTTCache(states, seen + input_ids.shape[1]) if use_cache else None
        return TTTCausalLMOutput(loss=loss, logits=logits, cache=new_cache)

    def _documents_apart(self, input_ids: Tensor, mask: Tensor | None, starts: Tensor) -> tuple[Tensor, Any]:
        """``(logits [B, T, V], states)`` of the documents in ``input_ids`` (``starts [B, T]`` bool marks
        each one's first token, ``mask`` the real tokens), each run as its own sequence: one right-padded
        row per document, since the mixers take right padding only. Padding columns hold zeros; ``states``
        are per document (per row where each row holds one)."""
        real = torch.ones_like(starts) if mask is None else mask
        per_row = starts.sum(1)
        doc = (per_row.cumsum(0) - per_row)[:, None] + starts.cumsum(1) - 1  # [B, T] document of a column
        rows, cols = real.nonzero(as_tuple=True)  # row-major: a document's tokens are adjacent, in order
        which = doc[rows, cols]
        lengths = torch.bincount(which, minlength=int(per_row.sum()))
        where = torch.arange(len(which), device=which.device) - (lengths.cumsum(0) - lengths)[which]
        ids = input_ids.new_zeros(len(lengths), int(lengths.max()))
        ids[which, where] = input_ids[rows, cols]
        apart = torch.zeros_like(ids, dtype=torch.bool)
        apart[which, where] = True
        out, states = self.model(ids, mask=apart)
        logits = out.new_zeros(*input_ids.shape, out.shape[-1])
        logits[rows, cols] = out[which, where]
        return logits, states

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """``GenerationMixin.generate``; ``output_hidden_states`` and ``output_attentions`` are refused (the
        model returns neither: transformers failed on the missing attribute after decoding)."""
        config = kwargs.get("generation_config")
        _refuse_outputs({**({} if config is None else config.to_dict()), **kwargs})
        return super().generate(*args, **kwargs)

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
        cache = _the_cache(cache, past_key_values)
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
