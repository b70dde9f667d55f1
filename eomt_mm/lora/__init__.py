"""LoRA for OpenMMLab models: layer, config-driven injection, freezing, adapters."""
from .layer import LoRALinear
from .config import LoRAConfig
from .inject import inject_lora
from .freeze import count_parameters, freeze_base_model
from .apply import apply_lora, get_lora_config
from .builder import WithLoRA
from .optim_constructor import TrainableOnlyOptimWrapperConstructor
from .adapters import (add_adapter, disable_adapters, load_adapter, save_adapter,
                       set_adapter, snapshot_base)
from .merge import merge_adapters, merge_lora, unmerge_adapters

__all__ = [
    'LoRALinear', 'inject_lora', 'freeze_base_model', 'count_parameters', 'LoRAConfig',
    'apply_lora', 'get_lora_config', 'WithLoRA', 'TrainableOnlyOptimWrapperConstructor',
    'save_adapter', 'load_adapter', 'set_adapter', 'add_adapter', 'snapshot_base',
    'disable_adapters', 'merge_lora', 'merge_adapters', 'unmerge_adapters'
]
