"""Suite-wide settings: the tests use tiny tensors, where one intra-op thread is fastest and does not
oversubscribe the 2 CI cores; GPU-marked tests skip cleanly without CUDA."""

import pytest
import torch

torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
