"""Training / evaluation machinery: hooks, schedulers, the CPU-aware DDP wrapper, tool helpers.

Importing it registers components only. Safe checkpointing is installed separately and
explicitly: :func:`eomt_mm.engine.safe_checkpoint.install_safe_checkpointing`.
"""
from . import ddp  # noqa: F401  (registers CpuAwareDistributedDataParallel)
from . import hooks  # noqa: F401
from . import schedulers  # noqa: F401  (registers TwoStageWarmupPolyLR)
