"""Token-by-token form of the family transition (decoding form, and oracle (b) of the tests)."""

from __future__ import annotations

import torch
from torch import Tensor

from .transition import Transition


def recurrent_transition(q: Tensor, tr: Transition, initial_state: Tensor) -> tuple[Tensor, Tensor]:
    """Run ``S_t = exp(g_t) S_{t-1} - remove_t (col_t * read_t^T S_{t-1}) + write_t value_t^T``.

    Args:
        q: queries, already scaled, [B, H, T, Dk] in the compute dtype.
        tr: the per-token transition (see ``Transition``).
        initial_state: S_0 [B, H, Dk, Dv].

    Returns:
        o [B, H, T, Dv] and the final state S_T [B, H, Dk, Dv].
    """
    S = initial_state
    outputs = []
    for t in range(q.shape[2]):
        decayed = S if tr.log_decay is None else torch.exp(tr.log_decay[:, :, t]).unsqueeze(-1) * S
        update = tr.write[:, :, t].unsqueeze(-1) * tr.value[:, :, t].unsqueeze(-2)
        if tr.remove is not None:
            # the correction reads the state before this token's decay (Comba, RWKV7); rules that
            # decay first (GDN, KDA) fold the decay into `read` instead
            predicted = torch.einsum("bhk,bhkv->bhv", tr.read[:, :, t], S)  # [B, H, Dv]
            if tr.col is not None:
                predicted = predicted * tr.col[:, :, t]
            update = update - tr.remove[:, :, t].unsqueeze(-1) * predicted.unsqueeze(-2)
        S = decayed + update
        outputs.append(torch.einsum("bhk,bhkv->bhv", q[:, :, t], S))
    return torch.stack(outputs, dim=2), S
