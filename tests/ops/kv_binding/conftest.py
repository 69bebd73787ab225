"""Family-rule tests run single-threaded: they are thousands of small tensor ops, and on a shared
2-core CPU intra-op threads spin-wait far more than they help (observed 20-100x slow-downs)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
