"""Engine-test setup: one intra-op thread (tiny models; on a shared, loaded machine OpenMP spinning costs 30x)."""

import pytest
import torch


@pytest.fixture(scope="package", autouse=True)
def _single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
