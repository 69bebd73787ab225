"""Run a function on R local processes joined in one gloo (CPU) or NCCL (CUDA) process group.

``torchrun`` is the launcher for real runs (docs/distributed.md); this helper is for tests and
benchmarks that start their own workers: no ports (a file rendezvous in a temporary directory), one
intra-op thread per rank, and each rank's return value handed back to the caller.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, fn: Callable, world: int, store: str, out: str, backend: str, threads: int, args):
    torch.set_num_threads(threads)
    dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def spawn(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    backend: str = "gloo",
    threads: int = 1,
    start_method: str = "spawn",
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` processes; return their results by rank.

    ``fn`` must be importable by name (a module-level function) and its result saveable by
    ``torch.save``. A failing rank raises here with its traceback.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    with tempfile.TemporaryDirectory(prefix="ttt-dist-") as tmp:
        store = os.path.join(tmp, "store")
        mp.start_processes(
            _worker,
            args=(fn, world_size, store, tmp, backend, threads, args),
            nprocs=world_size,
            join=True,
            start_method=start_method,
        )
        return [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]
