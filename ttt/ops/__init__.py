"""Functional TTT operators. Layout ``[B, H, T, D]``; state explicit; ``impl=`` picks the form."""

from . import forms, kv_binding  # the KV-binding reduction keeps its own namespace: ttt.ops.kv_binding.*
from ._compile import compile_chunk_steps
from ._dispatch import TTTOutput
from .family import *  # noqa: F403
from .family import __all__ as _family_all
from .general import ttt_general
from .ttt_attention import attention
from .ttt_linear import ttt_linear
from .ttt_mlp import ttt_mlp
from .types import Impl, TTTInputs, TTTState

__all__ = [
    "attention",
    "forms",
    "compile_chunk_steps",
    "Impl",
    "TTTOutput",
    "TTTInputs",
    "TTTState",
    "ttt_general",
    "ttt_linear",
    "ttt_mlp",
    "kv_binding",
    *_family_all,
]
