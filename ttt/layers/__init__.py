"""Drop-in sequence mixers with one protocol (see :mod:`ttt.layers.protocol`).

``MIXERS`` maps a name to a class built as ``cls(dim=..., num_heads=..., **layer_specific)``;
:func:`make_mixer` builds one by name, refusing in one line an argument the mixer does not take, and
:func:`mixer_parameters` lists the arguments it takes.
"""

from __future__ import annotations

import difflib
import inspect
import math
from collections.abc import Callable, Mapping
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


#: annotation names whose values a JSON ``--mixer-kwargs`` can give, and the check of each
_SIMPLE_TYPES: dict[str, Callable[[Any], bool]] = {
    "bool": lambda v: isinstance(v, bool),
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "None": lambda v: v is None,
}


def check_mixer_kwargs(name: str, kwargs: Mapping[str, Any]) -> None:
    """Refuse in one line (``TypeError``) an argument mixer ``name`` does not take, naming the mixer, the
    argument (and a close match) and the accepted ones. A value is refused in one line (``ValueError``) when
    it is a number that is not finite, or of a type its annotation does not allow (where the annotation is
    made of ``bool`` / ``int`` / ``float`` / ``str`` / ``None``; an ``int`` passes for a ``float``); an
    unknown mixer name is a ``ValueError`` too."""
    accepted = mixer_parameters(name)
    unknown = sorted(set(kwargs) - set(accepted))
    if not unknown:
        for key, value in kwargs.items():
            _check_value(name, key, value, accepted[key].annotation)
        return
    close = [m for k in unknown for m in difflib.get_close_matches(k, accepted, n=1)]
    plural = "s" if len(unknown) > 1 else ""
    raise TypeError(
        f"unknown argument{plural} {', '.join(map(repr, unknown))} for mixer {name!r}"
        + (f" (did you mean {', '.join(map(repr, close))}?)" if close else "")
        + ("" if {"dim", "num_heads"}.isdisjoint(unknown) else " (dim and num_heads are set by the model)")
        + f"; it accepts: {', '.join(sorted(accepted))}"
    )


def _check_value(name: str, key: str, value: Any, annotation: Any) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"argument {key!r} of mixer {name!r} must be finite, got {value}")
    kinds = [t.strip() for t in annotation.split("|")] if isinstance(annotation, str) else []
    if not kinds or not all(k in _SIMPLE_TYPES for k in kinds):
        return  # no annotation, or one naming other types (an enum, a tuple): the constructor checks
    if not any(_SIMPLE_TYPES[k](value) for k in kinds):
        raise ValueError(f"argument {key!r} of mixer {name!r} must be {' or '.join(kinds)}, got {value!r}")


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
