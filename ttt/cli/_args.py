"""Turn a recipe's argument dataclass into argparse options (help text = attribute docstrings)."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable
from typing import Any

__all__ = ["add_dataclass_args", "dataclass_from_namespace"]


def _split_optional(tp: Any) -> tuple[Any, bool]:
    """``int | None`` -> ``(int, True)``; ``int`` -> ``(int, False)``."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(tp))
    return tp, False


def _or_none(tp: Callable[[str], Any]) -> Callable[[str], Any]:
    """A parser of ``tp`` values that also reads ``none`` (any case) as None."""

    def parse(text: str) -> Any:
        return None if text.strip().lower() == "none" else tp(text)

    # argparse names the type in its error: "invalid int-or-none value: 'x'"
    parse.__name__ = f"{tp.__name__}-or-none"
    return parse


def add_dataclass_args(
    parser: argparse.ArgumentParser,
    cls: type,
    *,
    skip: tuple[str, ...] = (),
    required: tuple[str, ...] = (),
    notes: dict[str, str] | None = None,
) -> None:
    """One ``--option`` per field of ``cls`` with its type, default and docstring.

    ``required``: fields that must be given (their default is not shown). ``notes``: text appended to
    a field's help (e.g. choices read from a registry). The default is appended to the help unless it
    is None or the docstring already speaks of it. ``int | None`` and ``float | None`` options take
    ``none`` (any case) for None.
    """
    from ttt.recipes.args import field_docs

    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        doc = docs[f.name] + (f"; {notes[f.name]}" if notes and f.name in notes else "")
        # argparse expands %-formats in help texts
        doc = doc.replace("%", "%%")
        tp, optional = _split_optional(hints[f.name])
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=doc)
            continue
        if f.name in required:
            parser.add_argument(flag, type=tp, required=True, metavar=f.name.upper(), help=doc)
            continue
        # None says nothing a user can act on; a docstring that names its default says it better
        if f.default is not None and "default" not in doc.lower():
            doc += f" (default: {f.default})".replace("%", "%%")
        parser.add_argument(
            flag,
            type=_or_none(tp) if optional and tp in (int, float) else tp,
            default=f.default,
            metavar=f.name.upper(),
            help=doc,
        )


def dataclass_from_namespace(cls: type, ns: argparse.Namespace) -> Any:
    return cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)})
