"""Adapter files, named adapters on one loaded base, and switching adapters off.

An *adapter* is everything a LoRA fine-tune changes on top of the frozen base model:

* the ``lora_A`` / ``lora_B`` matrices of every :class:`~eomt_mm.lora.LoRALinear`,
* every other trainable parameter (heads, queries, norm layers kept trainable),
* the persistent buffers of the modules that own trainable parameters (e.g. the running
  statistics of a trainable BatchNorm in a decode head), since they change with training
  and the outputs depend on them.

Frozen base parameters are never written: an adapter holds only what training changed.
The subpackage is split by job:

* :mod:`.state`: which keys an adapter holds, fingerprints of the frozen base;
* :mod:`.files`: :func:`save_adapter`, :func:`read_adapter`, :func:`is_adapter_path` and
  the checks that an adapter fits a model;
* :mod:`.bank`: named adapters on one loaded base (:func:`load_adapter`,
  :func:`set_adapter`, :func:`add_adapter`, :func:`list_adapters`,
  :func:`active_adapter`, :func:`delete_adapter`, :func:`snapshot_base`);
* :mod:`.disable`: :func:`disable_adapters`, which temporarily restores the base model's
  behaviour exactly.
"""
from .bank import (ADAPTER_BANK_ATTR, AdapterBank, active_adapter, adapter_bank,
                   add_adapter, delete_adapter, list_adapters, load_adapter, set_adapter,
                   snapshot_base)
from .disable import disable_adapters
from .files import (ADAPTER_CONFIG_NAME, ADAPTER_FORMAT, ADAPTER_FORMAT_VERSION,
                    ADAPTER_WEIGHTS_NAME, check_fit, check_same_base, is_adapter_path,
                    read_adapter, save_adapter)
from .state import (KIND_BUFFER, KIND_LORA, KIND_TRAINABLE, AdapterMismatchError,
                    adapter_state_keys, base_trainable_keys, fingerprints_match,
                    frozen_base_keys, lora_layers, tensor_fingerprint)

__all__ = [
    'save_adapter', 'load_adapter', 'set_adapter', 'add_adapter', 'list_adapters',
    'active_adapter', 'delete_adapter', 'disable_adapters', 'snapshot_base',
    'read_adapter', 'is_adapter_path', 'check_fit', 'check_same_base',
    'adapter_state_keys', 'lora_layers', 'frozen_base_keys', 'base_trainable_keys',
    'tensor_fingerprint', 'fingerprints_match', 'AdapterMismatchError', 'AdapterBank',
    'adapter_bank', 'ADAPTER_WEIGHTS_NAME', 'ADAPTER_CONFIG_NAME', 'ADAPTER_FORMAT',
    'ADAPTER_FORMAT_VERSION', 'ADAPTER_BANK_ATTR', 'KIND_LORA', 'KIND_TRAINABLE',
    'KIND_BUFFER'
]
