"""Optional ``torch.compile`` of the chunked forms' per-mini-batch loop bodies.

Compiling a whole chunked op (``torch.compile(ttt.ops.ttt_linear)``) unrolls the Python loop over
mini-batches into one graph of T / b steps: 186 s of compilation on a CPU for T = 256 alone, useless at
T >= 2048. The loop body, though, sees the same shapes at every full mini-batch, so it compiles once and
the Python loop calls the compiled graph T / b times.

``compile_chunk_steps()`` (or ``TTT_COMPILE_STEPS=1`` in the environment) makes the chunked forms
(``impl="chunk"``) of TTT-Linear and TTT-MLP call ``torch.compile(body, dynamic=False, fullgraph=True)``
versions of their loop bodies:

- TTT-Linear: the forward step of the weight recurrence (inner gradient ``G = g(K_i Wa)`` and the update
  ``Wa - Kt_i G``) and the step of its hand-written backward (``scan.py``);
- TTT-MLP: ``dual_segment``, one mini-batch segment; autograd flows through it, so AOTAutograd compiles
  its forward and its backward.

The switch is off by default and the eager code path is then unchanged. Compilation is lazy (the first
call of each body) and the compiled function is cached per (body, compile options), so switching off
and on again reuses it. Each distinct input shape, stride or ``requires_grad`` pattern is one more graph
(``dynamic=False``): a trailing partial mini-batch, a call that resumes at an offset, or a broadcast
initial state adds a compilation the first time it is seen. The speed-up is the fusion of the many small
elementwise ops of the inner LayerNorm gradient; the matmuls are the same. Extra keyword arguments go to
``torch.compile`` (e.g. ``mode="max-autotune-no-cudagraphs"``); ``mode="reduce-overhead"`` (CUDA graphs)
does not fit: each step's outputs are kept across later replays of the same graph.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

_ENABLED = os.environ.get("TTT_COMPILE_STEPS", "0") not in ("", "0")
_OPTIONS: dict[str, Any] = {}
_CACHE: dict[tuple[Callable, str], Callable] = {}


def compile_chunk_steps(enabled: bool = True, **compile_kwargs: Any) -> None:
    """Route the chunked forms' loop bodies through ``torch.compile`` (``enabled=False`` restores eager).

    Args:
        enabled: compile the loop bodies from the next call on. Default: True.
        **compile_kwargs: passed to ``torch.compile`` on top of ``dynamic=False, fullgraph=True``
            (e.g. ``mode=...``, ``backend=...``). Default: none.

    Examples::

        >>> import ttt
        >>> ttt.ops.compile_chunk_steps()  # compiled at the first call of each body
        >>> ttt.ops.compile_chunk_steps(False)  # back to eager
    """
    global _ENABLED, _OPTIONS
    _ENABLED, _OPTIONS = bool(enabled), dict(compile_kwargs)


def chunk_steps_compiled() -> bool:
    """Whether the chunked forms currently call compiled loop bodies."""
    return _ENABLED


def maybe_compiled(fn: Callable) -> Callable:
    """``fn`` itself while the switch is off, else its (cached) compiled version."""
    if not _ENABLED:
        return fn
    options = {"dynamic": False, "fullgraph": True, **_OPTIONS}
    # options may hold dicts (``options=``), so the cache key is their repr
    key = (fn, repr(sorted(options.items())))
    if key not in _CACHE:
        _CACHE[key] = torch.compile(fn, **options)
    return _CACHE[key]
