"""The bank of named adapters on one loaded base: load, switch, add, list, delete.

The bank is a plain attribute of the model (not a submodule or buffer, so it stays out of
``state_dict``). :func:`load_adapter` stores an adapter under a name; :func:`set_adapter`
copies a stored one into the live parameters, keeping the previously active adapter's
current values first, so training one adapter and switching back keeps its training.

PEFT keeps one parameter set per adapter inside each layer; the bank keeps one live set and
swaps values instead, because the optimizer, DDP and mmengine checkpoints all hold
references to the live ``lora_A`` / ``lora_B`` parameters, which must therefore never be
replaced.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional

import torch
import torch.nn as nn

from eomt_mm.utils.model import unwrap_model
from .files import check_fit, check_same_base, read_adapter
from .state import (ScaleState, adapter_state_keys, base_trainable_keys, current_values,
                    layer_scale_state, live_tensors, lora_layers, set_layer_scale_state)

__all__ = [
    'ADAPTER_BANK_ATTR', 'AdapterBank', 'adapter_bank', 'snapshot_base', 'load_adapter',
    'set_adapter', 'add_adapter', 'list_adapters', 'active_adapter', 'delete_adapter'
]

ADAPTER_BANK_ATTR = '_eomt_mm_adapter_bank'


class AdapterBank:
    """Named adapters of one model: tensors, per-layer (alpha, rslora, scaling), configs."""

    def __init__(self) -> None:
        self.adapters: Dict[str, Dict[str, Any]] = {}
        self.active: Optional[str] = None
        self.base: Optional[Dict[str, torch.Tensor]] = None


def adapter_bank(model: nn.Module, create: bool = True) -> Optional[AdapterBank]:
    """The bank of named adapters attached to ``model``.

    Args:
        model (nn.Module): A model or model wrapper.
        create (bool): Attach an empty bank when there is none. Defaults to True.

    Returns:
        AdapterBank | None: The bank; None when there is none and ``create`` is False.
    """
    model = unwrap_model(model)
    bank = model.__dict__.get(ADAPTER_BANK_ATTR)
    if bank is None and create:
        bank = AdapterBank()
        # Plain attribute (not a submodule / buffer): stays out of state_dict.
        object.__setattr__(model, ADAPTER_BANK_ATTR, bank)
    return bank


def snapshot_base(model: nn.Module) -> List[str]:
    """Remember the current values of the trainable non-LoRA entries as the base.

    Trainable modules inside the base (e.g. the backbone's norm layers, which
    ``freeze_base_model`` keeps trainable by default) change during fine-tuning; this
    snapshot, like PEFT's saved copy of ``modules_to_save``, is what lets
    :func:`disable_adapters` give the base model's outputs exactly. Call it after the
    pretrained weights are loaded and before training or loading an adapter;
    :func:`load_adapter` takes it automatically the first time it runs on a model.

    Args:
        model (nn.Module): The LoRA-injected model.

    Returns:
        list[str]: The snapshotted keys.
    """
    live = live_tensors(model)
    keys = base_trainable_keys(model)
    adapter_bank(model).base = {k: live[k].detach().clone() for k in keys}
    return keys


def _copy_into_model(model: nn.Module, tensors: Mapping[str, torch.Tensor],
                     scales: Mapping[str, ScaleState]) -> None:
    """Copy adapter values into live tensors; merged layers are unmerged around it."""
    layers = lora_layers(model)
    live = live_tensors(model)
    merged = [layer for layer in layers.values() if layer.merged]
    with torch.no_grad():
        for layer in merged:
            layer.unmerge()
        try:
            for key, value in tensors.items():
                live[key].copy_(value)
            for name, state in scales.items():
                set_layer_scale_state(layers[name], state)
        finally:
            for layer in merged:
                layer.merge()


def load_adapter(model: nn.Module,
                 path: str,
                 adapter_name: str = 'default',
                 strict: bool = True,
                 activate: bool = True,
                 check_base: str = 'warn') -> Dict[str, Any]:
    """Load an adapter folder onto a model built with the adapter's ``lora_config``.

    The adapter is validated against the model first (layer names, ranks, fused-qkv
    slices, tensor shapes); nothing is changed when it does not fit. It is then stored
    under ``adapter_name`` and, when ``activate``, copied into the live parameters.

    Args:
        model (nn.Module): The base model with LoRA injected (wrappers are unwrapped).
        path (str): Adapter folder written by :func:`save_adapter`.
        adapter_name (str): Name to store it under; loading again under the same name
            replaces it. Defaults to ``'default'``.
        strict (bool): Require the adapter to cover exactly the model's adapter entries
            (see :func:`adapter_state_keys`); with False, entries the adapter lacks keep
            their values at load time. Defaults to True.
        activate (bool): Make it the active adapter. Defaults to True.
        check_base (str): What to do when the model's frozen base differs from the one
            the adapter was saved with (float64 sum / sum-of-squares fingerprints stored
            in ``adapter_config.json``): ``'warn'``, ``'error'`` or ``'ignore'``.
            Defaults to ``'warn'``.

    Returns:
        dict: The adapter's parsed ``adapter_config.json``.

    Raises:
        AdapterMismatchError: If the adapter does not fit the model; the message names
            every offending layer / key with both shapes.
    """
    if not isinstance(adapter_name, str) or not adapter_name:
        raise ValueError(f'adapter_name must be a non-empty string, got {adapter_name!r}')
    if check_base not in ('warn', 'error', 'ignore'):
        raise ValueError(f"check_base must be 'warn', 'error' or 'ignore', got {check_base!r}")
    tensors, config = read_adapter(path)
    check_fit(model, tensors, config, strict, repr(path))
    check_same_base(model, config, check_base, repr(path))
    bank = adapter_bank(model)
    if bank.base is None:
        snapshot_base(model)
    # Fill the keys a non-strict adapter lacks so every stored adapter is complete and
    # switching never leaves another adapter's values behind.
    full = current_values(model, list(adapter_state_keys(model)))
    live = live_tensors(model)
    for key, value in tensors.items():
        full[key] = value.to(dtype=live[key].dtype, device=live[key].device)
    layers = lora_layers(model)
    scales = {}
    for name, entry in config['layers'].items():
        alpha, rslora, scaling = layer_scale_state(layers[name])
        scales[name] = (float(entry.get('alpha', alpha)),
                        bool(entry.get('use_rslora', rslora)),
                        float(entry.get('scaling', scaling)))
    bank.adapters[adapter_name] = dict(tensors=full, scales=scales, config=config,
                                       source=str(path))
    if activate:
        set_adapter(model, adapter_name)
    return config


def set_adapter(model: nn.Module, adapter_name: str) -> None:
    """Make a stored adapter the live one, without rebuilding or reloading the base.

    The values of the previously active adapter are kept in the bank first, so an
    adapter trained after loading keeps its training when switched back to.

    Args:
        model (nn.Module): The model the adapters were loaded onto.
        adapter_name (str): A name given to :func:`load_adapter` or :func:`add_adapter`.
    """
    bank = adapter_bank(model, create=False)
    if bank is None or adapter_name not in bank.adapters:
        known = sorted(bank.adapters) if bank else []
        raise KeyError(f'no adapter named {adapter_name!r} on this model; loaded: {known}')
    if bank.active is not None and bank.active != adapter_name \
            and bank.active in bank.adapters:
        _store_live(model, bank.active)
    entry = bank.adapters[adapter_name]
    _copy_into_model(model, entry['tensors'], entry['scales'])
    bank.active = adapter_name


def _store_live(model: nn.Module, adapter_name: str) -> None:
    """Keep the live adapter values (and per-layer scales) in the bank under a name."""
    bank = adapter_bank(model)
    entry = bank.adapters.setdefault(adapter_name, dict(config=None, source=None))
    # Also the extra (frozen-in-this-model) keys a non-strict adapter brought along.
    own = adapter_state_keys(model)
    keys = list(own) + [k for k in entry.get('tensors', {}) if k not in own]
    entry['tensors'] = current_values(model, keys)
    entry['scales'] = {name: layer_scale_state(layer)
                       for name, layer in lora_layers(model).items()}


def add_adapter(model: nn.Module, adapter_name: str) -> None:
    """Store the model's current adapter values (e.g. just trained) under a name.

    Args:
        model (nn.Module): The LoRA-injected model.
        adapter_name (str): Name to store the current values under; becomes active.
    """
    if not lora_layers(model):
        raise ValueError('add_adapter: the model has no LoRALinear layer')
    bank = adapter_bank(model)
    _store_live(model, adapter_name)
    bank.active = adapter_name


def list_adapters(model: nn.Module) -> List[str]:
    """Names of the adapters stored on ``model``."""
    bank = adapter_bank(model, create=False)
    return sorted(bank.adapters) if bank else []


def active_adapter(model: nn.Module) -> Optional[str]:
    """Name of the active adapter, or None when none was loaded / set."""
    bank = adapter_bank(model, create=False)
    return bank.active if bank else None


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Forget a stored adapter (the live values are left as they are).

    Deleting the active adapter leaves no adapter active; the live parameters keep the
    values they have.

    Args:
        model (nn.Module): The model the adapters were loaded onto.
        adapter_name (str): A name given to :func:`load_adapter` or :func:`add_adapter`.

    Raises:
        KeyError: If no adapter of that name is stored; the message lists the loaded ones.
    """
    bank = adapter_bank(model, create=False)
    if bank is None or adapter_name not in bank.adapters:
        raise KeyError(f'no adapter named {adapter_name!r} on this model; loaded: '
                       f'{list_adapters(model)}')
    del bank.adapters[adapter_name]
    if bank.active == adapter_name:
        bank.active = None
