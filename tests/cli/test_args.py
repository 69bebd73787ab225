"""The one path from an argument dataclass to argparse options, for every subcommand and recipe."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import pytest

from ttt.cli.main import main
from ttt.recipes import digits, mqar
from ttt.recipes.args import add_dataclass_args, dataclass_parser, parse_dataclass, plain

COMMANDS = [[], ["train"], ["eval"], ["generate"], ["bench"], ["ls"]]
MARKUP = ("`", "**", ":func:", ":meth:", ":class:")


@pytest.mark.parametrize("argv", COMMANDS, ids=lambda a: " ".join(["ttt", *a]))
def test_cli_help_has_no_raw_markup(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main([*argv, "-h"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and out
    assert not [m for m in MARKUP if m in out], out


@pytest.mark.parametrize("recipe", [mqar, digits], ids=["mqar", "digits"])
def test_recipe_help_has_no_raw_markup_and_names_the_module(recipe, capsys):
    with pytest.raises(SystemExit) as e:
        recipe.main(["-h"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and f"python -m {recipe.__name__}" in out
    assert not [m for m in MARKUP if m in out], out


def test_plain_removes_roles_literals_and_bold():
    text = "see :func:`ttt.recipes.train.train`, ``ttt ls``, `x`, **bold** and :meth:`~a.b`; 2 * 3"
    assert plain(text) == "see ttt.recipes.train.train, ttt ls, x, bold and a.b; 2 * 3"


@dataclass
class _Args:
    name: str = "a"
    """a name, e.g. ``x``"""
    count: int = 3
    """how many"""
    mode: str = "fast"
    """the mode; its other defaults come from the preset"""
    scale: float | None = None
    """a scale ('none': off)"""
    flag: bool = False
    """turn it on"""


def test_one_converter_types_defaults_aliases_and_none():
    args = parse_dataclass(_Args, ["--name", "b", "--count", "4", "--scale", "none", "--flag"])
    assert args == _Args("b", 4, "fast", None, True)
    assert parse_dataclass(_Args, []) == _Args()
    assert parse_dataclass(_Args, ["--scale", "0.5", "--no-flag"]) == _Args(scale=0.5)
    assert parse_dataclass(_Args, ["--n", "z"], aliases={"name": ["--n"]}).name == "z"
    with pytest.raises(SystemExit):
        parse_dataclass(_Args, ["--count", "x"])
    text = dataclass_parser(_Args, "A tool; see ``x``.", prog="p").format_help()
    assert "(default: 3)" in text and "A tool; see x." in text and "`" not in text
    # a help text that only uses the word "default" still gets its default named (--match-params did not)
    assert "(default: fast)" in " ".join(text.split())


def test_counted_gives_the_noun_its_number():
    from ttt.recipes.common import counted

    assert [counted(n, "checkpoint") for n in (0, 1, 2)] == ["0 checkpoints", "1 checkpoint", "2 checkpoints"]


def test_recipes_parse_through_the_converter():
    parser = dataclass_parser(mqar.MQARArgs, aliases={"mixers": ["--mixer"]})
    ns = parser.parse_args(["--mixer", "ttt_linear", "--threads", "none", "--random-non-queries"])
    assert ns.mixers == "ttt_linear" and ns.threads is None and ns.random_non_queries is True
    ns = dataclass_parser(digits.DigitsArgs).parse_args(["--limit", "5", "--lr", "0.01"])
    assert ns.limit == 5 and ns.lr == 0.01


def test_unsupported_field_types_are_refused_when_the_parser_is_built():
    @dataclass
    class Bad:
        sizes: list[int] | None = None
        """sizes"""

    with pytest.raises(TypeError, match="Bad.sizes"):
        add_dataclass_args(argparse.ArgumentParser(), Bad)
