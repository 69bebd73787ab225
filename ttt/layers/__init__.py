"""Drop-in sequence mixers with one protocol (see :mod:`ttt.layers.protocol`).

``MIXERS`` maps a name to a class built as ``cls(dim=..., num_heads=..., **layer_specific)``.
"""

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
}

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
]
