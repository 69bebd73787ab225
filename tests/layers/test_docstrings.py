"""Every ``Examples::`` block in the layer and module docstrings runs as written."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "ttt.layers.attention",
    "ttt.layers.ttt",
    "ttt.layers.bidirectional",
    "ttt.layers.delta",
    "ttt.layers.rwkv",
    "ttt.layers.kv_binding",
]


@pytest.mark.parametrize("module", MODULES)
def test_docstring_examples(module):
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
