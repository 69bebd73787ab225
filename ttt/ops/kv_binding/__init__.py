"""TTT with KV binding is linear attention (Liu et al. 2026, arXiv 2602.21204): the reduction, its
chunk-parallel evaluation (online, mini-batch, or LaCT's shifted block-causal chunks with Muon), and
the TTT recurrence with the paper's ablation switches. See README.md."""

from ..forms import Form, register_form
from .muon import newton_schulz
from .parallel import kv_binding_parallel
from .recurrent import lact_recurrent
from .reduction import EffectiveLinearAttention, reduce_kv_binding, swiglu_features

# the forms a layer over this op chooses from (``impl=``): the chunk-parallel linear attention, with a
# one-token path for decoding, and the TTT recurrence itself (the slow oracle, whole causal sequences only)
register_form("kv_binding", Form("parallel", kv_binding_parallel, decode=True))
register_form("kv_binding", Form("recurrent", lact_recurrent, auto=False, non_causal=False))

__all__ = [
    "EffectiveLinearAttention",
    "kv_binding_parallel",
    "lact_recurrent",
    "newton_schulz",
    "reduce_kv_binding",
    "swiglu_features",
]
