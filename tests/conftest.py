import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Run every test on one torch thread (restored afterwards): the problems are tiny, and on a loaded
    2-core machine OpenMP spinning between threads makes each step up to ~100x slower."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
