from .lora_checkpoint_hook import LoRACheckpointHook  # noqa: F401
from .trainable_params_hook import TrainableParamsHook  # noqa: F401
from .mask_annealing_hook import MaskAnnealingHook  # noqa: F401
from .rng_state_hook import RNGStateHook, add_rng_state_hook  # noqa: F401
