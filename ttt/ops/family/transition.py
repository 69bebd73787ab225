"""The one state transition every family rule reduces to (its hand-derived closed form).

    S_t = Diag(exp(g_t)) S_{t-1} - remove_t (col_t * (read_t^T S_{t-1}))^T + write_t value_t^T
    o_t = S_t^T q_t

S is [Dk, Dv] per (batch, head). Additive rows (linear attention, RetNet, Mamba2, GLA, HGRN2, Hebbian)
have ``remove = None``; the delta rows (DeltaNet, GDN, KDA, Longhorn, Comba, RWKV7) have a rank-one
correction: diagonal-plus-low-rank (DPLR). Each rule's ``closed_form`` (in ``rules.py``) maps its
gates to these tensors; ``recurrent.py`` runs it token by token and ``chunk.py`` chunk-parallel.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class Transition(NamedTuple):
    """Per-token tensors of the DPLR transition (all in the compute dtype).

    Attributes:
        log_decay: ``g`` [B, H, T, 1] (scalar decay) or [B, H, T, Dk] (per key channel), ``<= 0``;
            None means no decay (``g = 0``).
        write: key written with the value [B, H, T, Dk].
        value: value written [B, H, T, Dv].
        remove: direction of the correction [B, H, T, Dk], or None (additive rule).
        read: key that reads the current prediction ``read^T S_{t-1}`` [B, H, T, Dk], or None.
        col: per value-column factor on the correction [B, H, T, Dv], or None (= 1).
    """

    log_decay: Tensor | None
    write: Tensor
    value: Tensor
    remove: Tensor | None = None
    read: Tensor | None = None
    col: Tensor | None = None
