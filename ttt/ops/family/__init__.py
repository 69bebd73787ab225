"""The linear-attention family as TTT rules: each op is one gradient step on an inner
objective over a matrix state ``S [B, H, Dk, Dv]`` with output ``o_t = S_t^T q_t``.

Forms (``impl=``): "chunk" | "recurrent" | "autograd" (alias "reference"). Derivations: README.md.
"""

from .additive import gla, hebbian, hgrn2, linear_attention, mamba2, retnet
from .delta import comba, deltanet, gated_deltanet, kda, longhorn, rwkv7

__all__ = [
    "linear_attention",
    "retnet",
    "mamba2",
    "gla",
    "hgrn2",
    "hebbian",
    "deltanet",
    "gated_deltanet",
    "kda",
    "longhorn",
    "comba",
    "rwkv7",
]
