"""Tests that call a script's main() in this process must not leave global torch state behind for the tests
after them: `--threads N` sets torch's thread count for the whole process."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    n = torch.get_num_threads()
    yield
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
