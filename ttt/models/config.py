"""Typed configuration of the generic causal LM, with named presets.

A model is a preset (a shape) plus a mixer name: ``LMConfig.from_name("125m", mixer="ttt_mlp")``.
The paper presets reproduce the shapes of ttt-lm-pytorch's ``TTT_STANDARD_CONFIGS`` (width / SwiGLU
width / blocks / heads); ``tiny`` is sized to train on two CPU cores in a few minutes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

__all__ = ["PRESETS", "LMConfig"]


@dataclass
class LMConfig:
    """Shape and mixer choice of :class:`ttt.models.CausalLM`.

    Attributes:
        vocab_size: number of token ids (256 for the byte tokenizer).
        dim: model width C.
        n_layers: number of blocks.
        n_heads: heads of every mixer; head dim = dim / n_heads.
        mixer: default mixer of every block, a key of ``ttt.layers.MIXERS``.
        layer_mixers: per-block mixer names for hybrids (length ``n_layers``); ``None`` = all ``mixer``.
        mixer_kwargs: extra constructor arguments per mixer name, e.g. ``{"ttt_linear": {"base_lr": 1.0}}``;
            a name that is not a mixer, or an argument its mixer does not take, is refused here.
        mlp_hidden: SwiGLU inner width; ``None`` = Llama's 8/3 * dim rounded to 64.
        max_seq_len: the longest sequence one ``forward`` call takes, and the longest prompt + new tokens
            ``generate`` takes. Continuing a state (``forward(state=...)``, ``step``) goes on past it on
            purpose: TTT and the family carry a constant state, and attention computes its RoPE positions
            rather than reading a table (length generalisation is then the model's, not guaranteed).
        norm_eps: RMSNorm epsilon (ttt-lm-pytorch ``rms_norm_eps``).
        tie_embeddings: share the input embedding and the output head (as ttt-lm-pytorch).
        init_std: std of the normal init of embeddings and MLP weights (GPT-2 / TTT: 0.02).
    """

    vocab_size: int = 256
    dim: int = 768
    n_layers: int = 12
    n_heads: int = 12
    mixer: str = "ttt_linear"
    layer_mixers: tuple[str, ...] | None = None
    mixer_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)
    mlp_hidden: int | None = None
    max_seq_len: int = 2048
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.layer_mixers is not None:
            self.layer_mixers = tuple(self.layer_mixers)
            if len(self.layer_mixers) != self.n_layers:
                raise ValueError(
                    f"layer_mixers (--layer-mixers) has {len(self.layer_mixers)} entries: give one per block "
                    f"({self.n_layers})"
                )
        if not isinstance(self.mixer_kwargs, dict) or not all(
            isinstance(v, dict) for v in self.mixer_kwargs.values()
        ):
            raise TypeError(
                f"mixer_kwargs must map mixer names to dicts of arguments, got {self.mixer_kwargs!r}"
            )
        from ttt.layers import check_mixer_kwargs

        for name, kwargs in self.mixer_kwargs.items():  # each a mixer, each argument one it takes
            check_mixer_kwargs(name, kwargs)
        if self.dim % self.n_heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        for name in (
            ("vocab_size", self.vocab_size),
            ("dim", self.dim),
            ("n_layers", self.n_layers),
            ("max_seq_len", self.max_seq_len),
        ):
            if name[1] < 1:
                raise ValueError(f"{name[0]} must be >= 1, got {name[1]}")

    @property
    def mixers(self) -> tuple[str, ...]:
        """The mixer name of each block."""
        return self.layer_mixers if self.layer_mixers is not None else (self.mixer,) * self.n_layers

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> LMConfig:
        """A preset by name (see ``PRESETS``), with fields overridden by keyword."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(overrides) - fields
        if unknown:
            raise ValueError(f"unknown LMConfig fields: {sorted(unknown)}")
        return cls(**{**PRESETS[name], **overrides})

    def num_params(self) -> int:
        """Parameter count of the model this config builds (one mixer of each kind is built to count it)."""
        from ttt.modules import swiglu_hidden_dim

        from .lm import build_mixer

        mixer_params = {name: sum(p.numel() for p in build_mixer(name, self).parameters())
                        for name in set(self.mixers)}  # fmt: skip
        hidden = self.mlp_hidden or swiglu_hidden_dim(self.dim)
        per_block = 2 * self.dim + 3 * self.dim * hidden
        embed = self.vocab_size * self.dim * (1 if self.tie_embeddings else 2)
        return embed + self.dim + sum(per_block + mixer_params[m] for m in self.mixers)

    def match_params(self, reference: LMConfig, multiple_of: int = 8) -> LMConfig:
        """A copy whose SwiGLU width makes the parameter count closest to ``reference``'s.

        The TTT paper compares mixers at equal parameters; mixers differ in their own parameter counts
        (TTT-MLP's learned W0 is 8 D^2 per head), so the MLP absorbs the difference.
        """
        from ttt.modules import swiglu_hidden_dim

        hidden = self.mlp_hidden or swiglu_hidden_dim(self.dim)
        per_unit = 3 * self.dim * self.n_layers  # gate, up, down rows per unit of SwiGLU width
        gap = reference.num_params() - self.num_params()
        new_hidden = max(multiple_of, hidden + round(gap / per_unit / multiple_of) * multiple_of)
        return dataclasses.replace(self, mlp_hidden=new_hidden)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["layer_mixers"] = list(self.layer_mixers) if self.layer_mixers is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LMConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise ValueError(f"not an LMConfig: unknown fields {sorted(unknown)}")
        return cls(**d)


#: named shapes. The paper's sizes use ttt-lm-pytorch's widths (TTT_STANDARD_CONFIGS) and its 2k context.
PRESETS: dict[str, dict[str, Any]] = {
    # for tests and smoke runs only (seconds on a CPU); not a useful model
    "micro": dict(dim=32, n_layers=2, n_heads=2, mlp_hidden=64, max_seq_len=512),
    # 4 blocks x 128 wide (~0.9M parameters): 2.4-2.8 validation bits/byte on Shakespeare after the default
    # 600 steps, 1.5-5 minutes on two CPU cores (benchmarks/results/lm_tiny_cpu.md).
    # head dim 32 keeps TTT's per-head D x D fast weights cheap; 8k positions allow long-prefix decoding.
    "tiny": dict(dim=128, n_layers=4, n_heads=4, mlp_hidden=384, max_seq_len=8192),
    "125m": dict(dim=768, n_layers=12, n_heads=12, mlp_hidden=2048, max_seq_len=2048),
    "350m": dict(dim=1024, n_layers=24, n_heads=16, mlp_hidden=2736, max_seq_len=2048),
    "760m": dict(dim=1536, n_layers=24, n_heads=16, mlp_hidden=4096, max_seq_len=2048),
    "1.3b": dict(dim=2048, n_layers=24, n_heads=32, mlp_hidden=5504, max_seq_len=2048),
}
