"""Drop-in sequence mixers with one protocol (see :mod:`ttt.layers.protocol`).

``MIXERS`` maps a name to a class built as ``cls(dim=..., num_heads=..., **layer_specific)``;
:func:`make_mixer` builds one by name, refusing in one line an argument the mixer does not take, and
:func:`mixer_parameters` lists the arguments it takes.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Mapping
from typing import Any

from torch import nn

from ttt.layers.additive import (
    HGRN2,
    GatedLinearAttention,
    HebbianFastWeights,
    LinearAttention,
    Mamba2,
    RetNet,
)
from ttt.layers.attention import Attention, KVCache, SlidingWindowAttention, SoftmaxAttention
from ttt.layers.bidirectional import Bidirectional
from ttt.layers.delta import Comba, DeltaNet, GatedDeltaNet, KimiDeltaAttention, Longhorn
from ttt.layers.kv_binding import KVBinding, KVBindingState
from ttt.layers.matrix import MatrixState
from ttt.layers.protocol import Mixer
from ttt.layers.rwkv import RWKV7
from ttt.layers.ttt import TTTMLP, TTTLayerState, TTTLinear
from ttt.layers.windowed import WindowedMixer, WindowedState

MIXERS: dict[str, type] = {
    "attention": SoftmaxAttention,
    "swa": SlidingWindowAttention,
    "ttt_linear": TTTLinear,
    "ttt_mlp": TTTMLP,
    "deltanet": DeltaNet,
    "gated_deltanet": GatedDeltaNet,
    "kda": KimiDeltaAttention,
    "longhorn": Longhorn,
    "comba": Comba,
    "linear_attention": LinearAttention,
    "retnet": RetNet,
    "mamba2": Mamba2,
    "gla": GatedLinearAttention,
    "hgrn2": HGRN2,
    "rwkv7": RWKV7,
    "hebbian": HebbianFastWeights,
    "kv_binding": KVBinding,
    "windowed": WindowedMixer,
}


def check_mixer_name(name: str) -> None:
    """Refuse (one-line ``ValueError``, listing the known ones) a name that is not in :data:`MIXERS`."""
    if name not in MIXERS:
        raise ValueError(f"unknown mixer {name!r}; choose one of {sorted(MIXERS)}")


def mixer_parameters(name: str) -> dict[str, inspect.Parameter]:
    """The arguments mixer ``name`` takes besides ``dim`` and ``num_heads``, read from the constructor
    signatures up its class chain (a constructor's ``**kwargs`` reaches its parent's). Where several
    constructors declare a name, the most derived one's parameter (and default) is the one that applies."""
    check_mixer_name(name)
    params: dict[str, inspect.Parameter] = {}
    for cls in MIXERS[name].__mro__:
        if cls is nn.Module:
            break
        if "__init__" not in vars(cls):
            continue
        passes_on = False
        for p in list(inspect.signature(cls.__init__).parameters.values())[1:]:  # [0] is self
            if p.kind is p.VAR_KEYWORD:
                passes_on = True
            elif p.kind is not p.VAR_POSITIONAL and p.name not in ("dim", "num_heads"):
                params.setdefault(p.name, p)
        if not passes_on:
            break
    return params


def check_mixer_kwargs(name: str, kwargs: Mapping[str, Any]) -> None:
    """Refuse in one line (``TypeError``) an argument mixer ``name`` does not take, naming the mixer, the
    argument (and a close match) and the accepted ones; an unknown name is a ``ValueError``."""
    accepted = mixer_parameters(name)
    unknown = sorted(set(kwargs) - set(accepted))
    if not unknown:
        return
    close = [m for k in unknown for m in difflib.get_close_matches(k, accepted, n=1)]
    plural = "s" if len(unknown) > 1 else ""
    raise TypeError(
        f"unknown argument{plural} {', '.join(map(repr, unknown))} for mixer {name!r}"
        + (f" (did you mean {', '.join(map(repr, close))}?)" if close else "")
        + ("" if {"dim", "num_heads"}.isdisjoint(unknown) else " (dim and num_heads are set by the model)")
        + f"; it accepts: {', '.join(sorted(accepted))}"
    )


def make_mixer(name: str, dim: int, num_heads: int, kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """``MIXERS[name](dim=dim, num_heads=num_heads, **kwargs)``, its name and arguments checked first
    (:func:`check_mixer_kwargs`)."""
    kwargs = dict(kwargs or {})
    check_mixer_kwargs(name, kwargs)
    return MIXERS[name](dim=dim, num_heads=num_heads, **kwargs)


__all__ = [
    "MIXERS",
    "Attention",
    "Bidirectional",
    "Comba",
    "DeltaNet",
    "GatedDeltaNet",
    "GatedLinearAttention",
    "HGRN2",
    "HebbianFastWeights",
    "KVCache",
    "KVBinding",
    "KVBindingState",
    "KimiDeltaAttention",
    "LinearAttention",
    "Longhorn",
    "Mamba2",
    "MatrixState",
    "Mixer",
    "RWKV7",
    "RetNet",
    "SlidingWindowAttention",
    "SoftmaxAttention",
    "TTTLayerState",
    "TTTLinear",
    "TTTMLP",
    "WindowedMixer",
    "WindowedState",
    "check_mixer_kwargs",
    "check_mixer_name",
    "make_mixer",
    "mixer_parameters",
]
