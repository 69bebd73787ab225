"""Suite-wide settings: the tests use tiny tensors, where one intra-op thread is fastest and does not
oversubscribe the 2 CI cores; GPU-marked tests skip cleanly without CUDA.

Without CUDA, Triton kernels run under its interpreter. Triton decides that when a kernel module is
first imported, so the variable is set here, before any test module imports triton (fla-core, the
layers and the kernels all may). Tests that need "no Triton on this machine" unset it themselves.
"""

import os

import pytest
import torch
from hypothesis import settings

# CI replays the same examples every run (a failure there is reproducible); local runs explore
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

torch.set_num_threads(1)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _one_thread():
    """Every test starts on one intra-op thread, whatever an earlier test (``ttt train --threads``, in
    process) left: the tests are thousands of small tensor ops, and on a shared 2-core machine torch's
    thread pool spin-waits far more than it helps (20-100x slow-downs observed)."""
    torch.set_num_threads(1)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        # the marker, not `"gpu" in item.keywords`: keywords also hold folder names (a checkout in ".../gpu")
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture
def corpus_dir(tmp_path):
    """A tiny corpus of 10 made-up documents (train 9 / validation 1), for the recipe and CLI tests."""
    d = tmp_path / "corpus"
    d.mkdir()
    for i in range(10):
        lines = [
            f"SPEAKER {j % 3}:\nline {i}-{j}, the quick brown fox jumps over the lazy dog.\n"
            for j in range(40)
        ]
        (d / f"doc{i:02d}.txt").write_text("\n".join(lines))
    return str(d)


@pytest.fixture
def nan_poison(monkeypatch):
    """Fill every torch.empty / empty_like / new_empty buffer with NaN, so outputs a kernel never wrote
    show up (STYLE R13); the GPU kernel tests take it."""
    empty, empty_like, new_empty = torch.empty, torch.empty_like, torch.Tensor.new_empty

    def fill(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: fill(empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: fill(empty_like(*a, **kw)))
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *a, **kw: fill(new_empty(self, *a, **kw)))
