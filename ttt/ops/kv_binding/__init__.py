"""TTT with KV binding is linear attention (Liu et al. 2026, arXiv 2602.21204): the reduction, its
chunk-parallel evaluation (online, mini-batch, or LaCT's shifted block-causal chunks with Muon), and
the TTT recurrence with the paper's ablation switches (the torch.func oracle and the written-out training
form). See README.md."""

from ..forms import Form, register_form
from .muon import newton_schulz
from .online import lact_online
from .parallel import kv_binding_parallel
from .recurrent import lact_recurrent
from .reduction import EffectiveLinearAttention, reduce_kv_binding, swiglu_features

# the forms a layer over this op chooses from (``impl=``): the chunk-parallel linear attention, with a
# one-token path for decoding, and the TTT recurrence itself (whole causal sequences only; its inner gradient
# written out in ``lact_online``, tested against ``lact_recurrent``, the torch.func oracle)
register_form("kv_binding", Form("parallel", kv_binding_parallel, decode=True))
register_form("kv_binding", Form("recurrent", lact_online, auto=False, non_causal=False))

__all__ = [
    "EffectiveLinearAttention",
    "kv_binding_parallel",
    "lact_online",
    "lact_recurrent",
    "newton_schulz",
    "reduce_kv_binding",
    "swiglu_features",
]
