"""Turn a recipe's argument dataclass into argparse options (help text = attribute docstrings)."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any

__all__ = ["add_dataclass_args", "dataclass_from_namespace"]


def _base_type(tp: Any) -> Any:
    """``int | None`` -> ``int``."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, *, skip: tuple[str, ...] = ()) -> None:
    """One ``--option`` per field of ``cls`` with its type, default and docstring."""
    from ttt.recipes.args import field_docs

    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        tp = _base_type(hints[f.name])
        if tp is bool:
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=f.default, help=docs[f.name]
            )
        else:
            parser.add_argument(
                flag,
                type=tp,
                default=f.default,
                metavar=f.name.upper(),
                help=f"{docs[f.name]} (default: {f.default})",
            )


def dataclass_from_namespace(cls: type, ns: argparse.Namespace) -> Any:
    return cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)})
