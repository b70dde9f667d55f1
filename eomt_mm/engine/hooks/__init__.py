from .lora_checkpoint_hook import LoRACheckpointHook  # noqa: F401
from .trainable_params_hook import TrainableParamsHook  # noqa: F401
from .mask_annealing_hook import MaskAnnealingHook  # noqa: F401
from .rng_state_hook import RNGStateHook, add_rng_state_hook  # noqa: F401
from .lora_config_check_hook import LoRAConfigCheckHook, add_lora_config_check_hook  # noqa: F401
from .finished_run_hook import (FinishedRunHook, TrainingAlreadyFinished,  # noqa: F401
                                add_finished_run_hook)
from .custom_hooks import add_custom_hook  # noqa: F401
