"""Multi-process execution on ``torch.distributed``: context parallelism (one sequence split along T
over ranks) and FSDP2 sharded training. Derivations and the communication volumes: README.md."""

from .comm import COUNTER, CommCounter, all_gather
from .context_parallel import (
    FAMILY_CP_RULES,
    context_parallel_groups,
    cp_attention,
    cp_bytes,
    cp_family,
    cp_ttt,
    disable_context_parallel,
    enable_context_parallel,
    restore_context_parallel,
)
from .launch import spawn

__all__ = [
    "COUNTER",
    "CommCounter",
    "FAMILY_CP_RULES",
    "all_gather",
    "context_parallel_groups",
    "cp_attention",
    "cp_bytes",
    "cp_family",
    "cp_ttt",
    "disable_context_parallel",
    "enable_context_parallel",
    "restore_context_parallel",
    "spawn",
]
