"""The one place that decides which form of an operator runs (``impl=``).

Every operator (``ttt_linear``, ``ttt_mlp``, ``ttt_attention``, each family rule) keeps a table of
:class:`Form` rows here, in order of preference. A row says what the form supports -- devices, dtypes,
head dims, non-causal calls, packed sequences (``cu_seqlens``), a one-token decode path -- and where its
function lives. Ops and layers call :func:`resolve`; nothing else chooses a form.

``impl=<name>`` runs that form or raises with the reason it cannot run these inputs (no silent fallback).

``impl="auto"`` means one thing for every operator and layer: the first row of the operator's table, in
order, that ``auto`` may pick (``Form.auto``) and that supports the call; at a decode step (one causal
token, ``decode=True``) the rows that declare a decode path come first. It never depends on grad mode.
Today that is: the Triton kernels on CUDA where they apply, else the chunked form; for a TTT-Linear or
family decode step off CUDA, the token-by-token ``recurrent`` form.

A backend adds itself with :func:`register_form`, e.g. a CUDA kernel for a family rule::

    register_form("gated_deltanet", Form("fla", "my_pkg.fla:gated_deltanet_form", devices=("cuda",),
                                         requires="fla"), first=True)

The function of a family form is called as ``fn(rule, q, tokens, S0, chunk_size=...) -> (o, S_T)``
(see :mod:`ttt.ops.family.dispatch`); of a TTT form as ``fn(q, k, v, lr, ln_weight, ln_bias, token_eta,
state, causal=..., eps=...[, cu_seqlens=...]) -> (o, TTTState)``.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
AUTO = "auto"


@dataclass(frozen=True)
class Form:
    """One way to compute an operator, and what it supports.

    Attributes:
        name: what ``impl=`` calls it.
        fn: the function, or ``"module:function"`` imported on first use (keeps Triton optional).
        aliases: other names ``impl=`` accepts for it.
        auto: whether ``impl="auto"`` may pick it (the slow references say False).
        decode: ``"auto"`` prefers it at a decode step (one causal token).
        decode_fn: a separate function for decode steps, same signature as ``fn`` (an inference
            kernel: its backward raises); None: ``fn`` serves decode steps too.
        packed: takes ``cu_seqlens`` itself (others run packed sequences one call each).
        non_causal: supports ``causal=False``.
        dtypes: input dtypes it accepts.
        devices: device types it runs on (None: any).
        auto_max_head_dim: the widest head "auto" sends it (None: any; a name still runs wider ones).
        requires: a module that must be importable (e.g. ``"triton"``).
        interpreted: runs off CUDA under ``TRITON_INTERPRET=1`` (the Triton interpreter, for tests).
    """

    name: str
    fn: Callable | str
    aliases: tuple[str, ...] = ()
    auto: bool = True
    decode: bool = False
    decode_fn: Callable | str | None = None
    packed: bool = False
    non_causal: bool = True
    dtypes: tuple[torch.dtype, ...] = FLOATS
    devices: tuple[str, ...] | None = None
    auto_max_head_dim: int | None = None
    requires: str | None = None
    interpreted: bool = False

    def load(self, decode: bool = False) -> Callable:
        """The form's function, or its decode function at a ``decode`` step (imports a lazy
        ``"module:function"`` path, naming what is missing)."""
        fn = self.decode_fn if decode and self.decode_fn is not None else self.fn
        return _import(self.name, fn) if isinstance(fn, str) else fn

    def refuses(self, q: Tensor, *, causal: bool = True, explicit: bool = True) -> str | None:
        """Why the form cannot run inputs like ``q`` ``[..., D]`` (None when it can). ``explicit``: named
        by ``impl=`` (then the Triton interpreter counts, and head dims past ``auto_max_head_dim`` do)."""
        refusal = self._refusal(q, causal, explicit)
        return None if refusal is None else refusal[1]

    def _refusal(self, q: Tensor, causal: bool, explicit: bool) -> tuple[type[Exception], str] | None:
        interpreted = explicit and self.interpreted and os.environ.get("TRITON_INTERPRET") == "1"
        if self.devices is not None and q.device.type not in self.devices and not interpreted:
            extra = " (or TRITON_INTERPRET=1 on CPU)" if self.interpreted else ""
            where = " or ".join("CUDA" if d == "cuda" else d for d in self.devices)
            return ValueError, f"it needs {where} tensors{extra}; q is on {q.device}"
        if self.requires is not None and not _installed(self.requires):
            return ImportError, f"it needs {self.requires}, which is not installed"
        if q.dtype not in self.dtypes:
            return TypeError, f"it takes {', '.join(str(d) for d in self.dtypes)} inputs; q is {q.dtype}"
        if not explicit and self.auto_max_head_dim is not None and q.shape[-1] > self.auto_max_head_dim:
            return (
                ValueError,
                f"'auto' sends it heads up to {self.auto_max_head_dim} wide; q has {q.shape[-1]}",
            )
        if not causal and not self.non_causal:
            return ValueError, "it is causal only (causal=False given)"
        return None


@functools.cache
def _installed(module: str) -> bool:
    # asked on every "auto" call (each layer step): look it up once
    return importlib.util.find_spec(module) is not None


@functools.cache
def _import(name: str, path: str) -> Callable:
    module, attr = path.split(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except ImportError as err:
        raise ImportError(f"impl={name!r} needs {module}: {err}") from err


_TABLES: dict[str, list[Form]] = {}


def register_form(op: str, form: Form, *, first: bool = False) -> None:
    """Add ``form`` to operator ``op``'s table: last (least preferred by "auto"), or ``first``.

    A form of the same name is replaced in place. Raises if a name or alias is taken by another form.
    """
    table = _TABLES.setdefault(op, [])
    table[:] = [f for f in table if f.name != form.name]
    taken = {n for f in table for n in (f.name, *f.aliases)}
    clash = taken & {form.name, *form.aliases}
    if clash or form.name == AUTO:
        raise ValueError(f"{op}: the form name(s) {sorted(clash or {AUTO})} are taken")
    table.insert(0, form) if first else table.append(form)


def forms_of(op: str) -> tuple[Form, ...]:
    """Operator ``op``'s forms in order of preference."""
    if op not in _TABLES:
        raise KeyError(f"no operator {op!r} has forms; known: {sorted(_TABLES)}")
    return tuple(_TABLES[op])


def check_impl(op: str, impl: object) -> str:
    """The canonical name of ``impl`` for ``op`` (``"auto"`` stays ``"auto"``); raises on an unknown name.

    Layers call this at construction, so a typo fails before the first forward.
    """
    value = getattr(impl, "value", impl)
    if value == AUTO:
        return AUTO
    for form in forms_of(op):
        if value in (form.name, *form.aliases):
            return form.name
    names = ", ".join(repr(n) for f in forms_of(op) for n in (f.name, *f.aliases))
    raise ValueError(f"impl must be one of {names} or 'auto' for {op}, got {impl!r}")


def resolve(op: str, impl: object, q: Tensor, *, causal: bool = True, decode: bool = False) -> Form:
    """The form that runs ``op`` on inputs like ``q`` ``[..., T, D]`` (see the module docstring).

    Args:
        op: the operator's name (a key of the table).
        impl: a form name or alias, or ``"auto"``.
        q: the queries (device, dtype and head dim are read from it).
        causal: the call is causal.
        decode: the call is a decode step (one causal token; ``"auto"`` prefers decode forms).

    Raises:
        ValueError: unknown ``impl``, or the named form cannot run these inputs (the reason is given).
        TypeError: the named form does not take q's dtype.
        ImportError: the named form needs a package that is not installed.
    """
    name = check_impl(op, impl)
    table = forms_of(op)
    if name != AUTO:
        form = next(f for f in table if f.name == name)
        refusal = form._refusal(q, causal, explicit=True)
        if refusal is not None:
            error, reason = refusal
            raise error(f"impl={name!r} cannot run this {op} call: {reason}")
        return form
    candidates = [f for f in table if f.auto]
    if decode:
        candidates = [f for f in candidates if f.decode] + [f for f in candidates if not f.decode]
    for form in candidates:
        if form._refusal(q, causal, explicit=False) is None:
            return form
    raise ValueError(f"impl='auto' found no form of {op} for q {q.dtype} {list(q.shape)} on {q.device}")
