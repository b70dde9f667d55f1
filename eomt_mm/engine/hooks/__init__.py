from .lora_checkpoint_hook import LoRACheckpointHook  # noqa: F401
from .trainable_params_hook import TrainableParamsHook  # noqa: F401
from .mask_annealing_hook import MaskAnnealingHook  # noqa: F401
