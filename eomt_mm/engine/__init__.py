from . import checkpoint  # noqa: F401  (weights-only loading, atomic saving)
from . import ddp  # noqa: F401  (registers CpuAwareDistributedDataParallel)
from . import hooks  # noqa: F401
from . import schedulers  # noqa: F401  (registers TwoStageWarmupPolyLR)
