import os

import pytest
import torch

# Tests are CPU-only and must be deterministic and quick on 2 cores.
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')
torch.set_num_threads(min(2, os.cpu_count() or 1))

import eomt_mm  # noqa: E402,F401  (registers everything once for the whole session)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
