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
(``dynamic=False``): a trailing partial mini-batch, a call that resumes at an offset, a broadcast
initial state, and for TTT-Linear every new sequence length (the per-step slices' strides depend on T)
adds a compilation the first time it is seen. When dynamo refuses another graph for a body (its
recompile limit, 8 by default), that body runs eagerly from then on, with one warning. The speed-up is
the fusion of the many small elementwise ops of the inner LayerNorm gradient; the matmuls are the same.
Extra keyword arguments go to ``torch.compile`` (e.g. ``mode="max-autotune-no-cudagraphs"``);
``mode="reduce-overhead"`` (CUDA graphs) does not fit: each step's outputs are kept across later replays of
the same graph.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

import torch


def _env_switch(value: str) -> bool:
    """``TTT_COMPILE_STEPS``: off for "", "0", "false", "no", "off" (any case), on otherwise."""
    return value.strip().lower() not in ("", "0", "false", "no", "off")


_ENABLED = _env_switch(os.environ.get("TTT_COMPILE_STEPS", "0"))
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
        _CACHE[key] = _eager_after_recompile_limit(fn, torch.compile(fn, **options))
    return _CACHE[key]


def _recompile_limit_errors() -> tuple[type[BaseException], ...]:
    """Dynamo's "too many graphs for this function" errors in this torch version."""
    exc = getattr(torch, "_dynamo", None) and getattr(torch._dynamo, "exc", None)
    names = ("FailOnRecompileLimitHit", "FailOnCacheLimitHit")
    return tuple(getattr(exc, name) for name in names if exc is not None and hasattr(exc, name))


def _eager_after_recompile_limit(fn: Callable, compiled: Callable) -> Callable:
    """``compiled``, until dynamo refuses another graph for ``fn`` (each new shape or stride pattern is one,
    e.g. every new sequence length); from then on ``fn`` eagerly, with one warning."""
    errors, state = _recompile_limit_errors(), {"eager": False}

    def call(*args, **kwargs):
        if not state["eager"]:
            try:
                return compiled(*args, **kwargs)
            except errors as err:
                state["eager"] = True
                warnings.warn(
                    f"compile_chunk_steps: {fn.__qualname__} hit torch.compile's recompile limit ({err}); it "
                    "runs eagerly from now on (torch._dynamo.config.recompile_limit allows more graphs)",
                    stacklevel=2,
                )
        return fn(*args, **kwargs)

    return call
