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


@pytest.fixture(autouse=True)
def _mmseg_default_scope():
    """Every test starts in mmseg's scope, whatever an earlier test's Runner left current.

    mmengine keeps the most recently created ``DefaultScope`` current for the whole process, and
    ``Registry.build`` resolves unscoped types in the current scope's registry: a Runner built
    with ``default_scope='mmengine'`` in one test would otherwise make ``MODELS.build`` of an
    mmseg type fail in a later one. ``overwrite_default_scope`` restores the previous scopes on
    exit.
    """
    from mmengine.registry import DefaultScope
    with DefaultScope.overwrite_default_scope('mmseg'):
        yield
