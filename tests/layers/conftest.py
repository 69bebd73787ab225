"""Tiny float64 tensors: one intra-op thread is faster, and avoids oversubscribing shared CI cores
(with 2 cores and several busy processes, torch's default thread pool made these tests ~20x slower)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
