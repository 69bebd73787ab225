"""TTT with KV binding is linear attention (Liu et al. 2026, arXiv 2602.21204): the reduction, its
chunk-parallel evaluation, and the TTT recurrence with the paper's ablation switches. See README.md."""

from .parallel import kv_binding_parallel
from .recurrent import lact_recurrent
from .reduction import EffectiveLinearAttention, reduce_kv_binding, swiglu_features

__all__ = [
    "EffectiveLinearAttention",
    "kv_binding_parallel",
    "lact_recurrent",
    "reduce_kv_binding",
    "swiglu_features",
]
