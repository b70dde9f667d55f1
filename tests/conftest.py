import os

import pytest
import torch

# Tests are CPU-only and must be deterministic and quick on 2 cores.
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')
torch.set_num_threads(min(2, os.cpu_count() or 1))

import eomt_mm  # noqa: E402,F401  (registers everything once for the whole session)
from eomt_mm.engine.safe_checkpoint import install_safe_checkpointing  # noqa: E402

# The tests run mmengine as this project's tools do: with weights-only checkpoint loading and
# atomic checkpoint writes installed (``import eomt_mm`` alone does not install them; the tests
# of that run in subprocesses, see tests/test_engine_checkpoint.py).
install_safe_checkpointing()


@pytest.fixture(autouse=True)
def _fixed_torch_random_state():
    torch.manual_seed(0)
    yield
