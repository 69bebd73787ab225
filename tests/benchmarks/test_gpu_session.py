"""benchmarks/gpu_session.sh, checked without running it: shell syntax, and every test file, test function
(``--deselect`` ones too: pytest ignores a mistyped one silently) and script it names exists. The full dry
run (collect-only with counts, the CLI and the benchmark at tiny sizes) takes about a minute:
``DRY=1 CALL=1 bash benchmarks/gpu_session.sh && DRY=1 CALL=2 bash benchmarks/gpu_session.sh``."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_session.sh"


def _text() -> str:
    """The script with its variables for test files expanded."""
    text = SCRIPT.read_text()
    for name, value in re.findall(r"^(\w+)=(tests/\S+\.py)$", text, flags=re.M):
        text = text.replace(f"${name}", value)
    return text


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_every_test_id_names_a_test_that_exists():
    text = _text()
    ids = re.findall(r"(tests/[\w/]+\.py)(?:::(\w+))?", text)
    assert len(ids) >= 10, ids
    for path, func in ids:
        assert (ROOT / path).is_file(), f"{path} does not exist"
        if func:
            source = (ROOT / path).read_text()
            assert re.search(rf"^def {func}\(", source, flags=re.M), f"{path} has no test {func}"


def test_every_script_it_runs_exists():
    scripts = set(re.findall(r"(benchmarks/\w+\.py)", _text()))
    assert {"benchmarks/model_gpu.py", "benchmarks/kernels_ttt_linear.py"} <= scripts
    for path in scripts:
        assert (ROOT / path).is_file(), f"{path} does not exist"
