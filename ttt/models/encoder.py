"""A bidirectional sequence classifier over any mixer: each block's mixer is wrapped in
:class:`ttt.layers.Bidirectional` (a forward pass and a reversed pass with small tanh gates, the recipe
of the TTT video model), so every token sees the whole sequence.

Shapes: B batch, T tokens, C width, K classes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ttt.modules import RMSNorm

from .lm import Block

__all__ = ["EncoderClassifier", "EncoderConfig"]


@dataclass
class EncoderConfig:
    """Shape of :class:`EncoderClassifier`.

    Attributes:
        vocab_size: token ids (17 for the digits' pixel intensities 0..16).
        num_classes: K.
        max_len: longest sequence; positions are learned (the mixers' own positions are causal).
        dim, n_layers, n_heads: width, blocks, heads.
        mixer: a name in ``ttt.layers.MIXERS``, made bidirectional.
        mixer_kwargs: extra constructor arguments of the mixer.
        mlp_hidden: SwiGLU width (``None``: 8/3 * dim).
    """

    vocab_size: int = 17
    num_classes: int = 10
    max_len: int = 64
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    mixer: str = "ttt_linear"
    mixer_kwargs: dict[str, Any] = field(default_factory=dict)
    mlp_hidden: int | None = None


class EncoderClassifier(nn.Module):
    """Embedding + learned positions -> bidirectional blocks -> RMSNorm -> mean over real tokens -> linear."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        from ttt.layers import Bidirectional

        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.pos = nn.Parameter(torch.zeros(config.max_len, config.dim))
        self.blocks = nn.ModuleList(
            Block(config.dim,
                  Bidirectional.from_name(config.mixer, dim=config.dim, num_heads=config.n_heads,
                                          **config.mixer_kwargs),
                  config.mlp_hidden, 1e-6)
            for _ in range(config.n_layers)
        )  # fmt: skip
        self.norm = RMSNorm(config.dim)
        self.classifier = nn.Linear(config.dim, config.num_classes)
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.pos, std=0.02)

    def forward(self, idx: Tensor, mask: Tensor | None = None) -> Tensor:
        """``idx [B, T]`` (``mask [B, T]`` bool, right padding) -> class logits ``[B, K]``."""
        if idx.shape[1] > self.config.max_len:
            raise ValueError(
                f"sequence of {idx.shape[1]} tokens is longer than max_len = {self.config.max_len}"
            )
        x = self.embed(idx) + self.pos[: idx.shape[1]]  # [B, T, C]
        for block in self.blocks:
            x, _ = block(x, mask=mask)
        x = self.norm(x)
        if mask is None:
            pooled = x.mean(dim=1)
        else:
            w = mask.to(x.dtype)[..., None]
            pooled = (x * w).sum(dim=1) / w.sum(dim=1).clamp(min=1)
        return self.classifier(pooled)
