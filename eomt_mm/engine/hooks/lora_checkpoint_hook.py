"""``LoRACheckpointHook``: adapter-only training checkpoints that still resume.

mmengine writes ``model.state_dict()`` whole into every training checkpoint: with a
frozen ViT-L base that is ~1.2 GB per save for a few MB that changed. With this hook

* ``before_save_checkpoint`` removes the frozen base parameters from
  ``checkpoint['state_dict']`` (selected by exact state-dict key: the keys of parameters
  with ``requires_grad=False`` inside the lora_config's ``base_prefixes``; never by
  substring, which would also drop other modules' keys) and records in
  ``checkpoint['meta']['lora_adapter_only']`` which keys were dropped, with a float64
  (sum, sum of squares) fingerprint of each;
* ``after_load_checkpoint`` (called by ``Runner.load_checkpoint`` for both ``resume`` and
  ``load_from``, before the weights are loaded) puts the dropped keys back from the live
  model, whose base was initialised from the pretrained weights by ``init_weights`` (the
  Runner initialises before it loads or resumes), after checking the fingerprints so a
  run is never resumed on another base.

Config::

    custom_hooks = [dict(type='LoRACheckpointHook')]
"""
from __future__ import annotations

from typing import Any, List, Mapping, MutableMapping

import torch.nn as nn
from mmengine.hooks import Hook
from mmseg.registry import HOOKS

from eomt_mm.lora.adapters import fingerprints_match, frozen_base_keys, tensor_fingerprint
from eomt_mm.utils.model import unwrap_model

__all__ = [
    'LoRACheckpointHook', 'ADAPTER_ONLY_META_KEY', 'frozen_base_keys',
    'strip_frozen_base', 'restore_frozen_base', 'is_adapter_only_checkpoint'
]

ADAPTER_ONLY_META_KEY = 'lora_adapter_only'
_FORMAT_VERSION = 1
_MAX_LISTED = 10


def is_adapter_only_checkpoint(checkpoint: Mapping[str, Any]) -> bool:
    """Whether ``checkpoint`` was written with the frozen base stripped by this hook."""
    meta = checkpoint.get('meta') if isinstance(checkpoint, Mapping) else None
    return isinstance(meta, Mapping) and ADAPTER_ONLY_META_KEY in meta


def strip_frozen_base(model: nn.Module, checkpoint: MutableMapping[str, Any]) -> List[str]:
    """Remove the frozen base parameters from ``checkpoint['state_dict']`` in place.

    Args:
        model (nn.Module): The model the checkpoint was taken from.
        checkpoint (dict): An mmengine checkpoint (``state_dict`` and ``meta``).

    Returns:
        list[str]: The removed keys.
    """
    state_dict = checkpoint['state_dict']
    dropped = [k for k in frozen_base_keys(model) if k in state_dict]
    record = dict(format_version=_FORMAT_VERSION, keys=dropped,
                  fingerprints=[tensor_fingerprint(state_dict[k]) for k in dropped],
                  shapes=[list(state_dict[k].shape) for k in dropped])
    for k in dropped:
        del state_dict[k]
    checkpoint.setdefault('meta', {})[ADAPTER_ONLY_META_KEY] = record
    return dropped


def restore_frozen_base(model: nn.Module, checkpoint: MutableMapping[str, Any],
                        verify: bool = True) -> List[str]:
    """Put the keys :func:`strip_frozen_base` removed back, from the live ``model``.

    Args:
        model (nn.Module): The model about to receive the checkpoint, its base already
            initialised with the pretrained weights.
        checkpoint (dict): An adapter-only checkpoint (no-op for a full one).
        verify (bool): Check shapes and fingerprints of the live base against the ones
            recorded at save time. Defaults to True.

    Returns:
        list[str]: The keys filled in.

    Raises:
        RuntimeError: If a recorded key is missing in the model or its live weights are
            not the ones the checkpoint was trained on.
    """
    if not is_adapter_only_checkpoint(checkpoint):
        return []
    record = checkpoint['meta'][ADAPTER_ONLY_META_KEY]
    if not isinstance(record, Mapping) or record.get('format_version') != _FORMAT_VERSION:
        raise RuntimeError(f'checkpoint meta[{ADAPTER_ONLY_META_KEY!r}] has an unknown '
                           f'format (expected format_version {_FORMAT_VERSION})')
    live = unwrap_model(model).state_dict(keep_vars=True)
    keys = list(record['keys'])
    missing = [k for k in keys if k not in live]
    if missing:
        raise RuntimeError(
            f'adapter-only checkpoint: the frozen base keys {missing[:_MAX_LISTED]} '
            f'({len(missing)} in all) it omits do not exist in this model, so they '
            'cannot be taken from it; build the model from the config it was trained with')
    if verify:
        bad = []
        for k, fp, shape in zip(keys, record['fingerprints'], record['shapes']):
            t = live[k]
            if list(t.shape) != list(shape):
                bad.append(f'{k}: shape {list(t.shape)} in the model, {shape} when saved')
            elif not fingerprints_match(tensor_fingerprint(t), fp, t.numel()):
                bad.append(f'{k}: values differ')
        if bad:
            raise RuntimeError(
                'adapter-only checkpoint: the live model\'s frozen base is not the one '
                f'this checkpoint was trained on ({len(bad)} tensor(s)): '
                f'{bad[:_MAX_LISTED]}. Initialise the base with the same pretrained '
                'weights (model init_cfg) before loading or resuming.')
    state_dict = checkpoint['state_dict']
    for k in keys:
        if k not in state_dict:
            state_dict[k] = live[k].detach()
    return keys


@HOOKS.register_module()
class LoRACheckpointHook(Hook):
    """Make training checkpoints adapter-only and resume from them.

    Args:
        adapter_only (bool): Strip the frozen base from saved checkpoints. With False the
            hook only restores adapter-only checkpoints on load. Defaults to True.
        verify_base (bool): On load, check that the live frozen base matches the
            fingerprints recorded at save time. Defaults to True.
    """

    # Last among the hooks, so it strips the state dict in its final form; the default
    # hooks do not read model weights in after_load_checkpoint.
    priority = 'VERY_LOW'

    def __init__(self, adapter_only: bool = True, verify_base: bool = True) -> None:
        if not isinstance(adapter_only, bool) or not isinstance(verify_base, bool):
            raise TypeError('LoRACheckpointHook: adapter_only and verify_base must be '
                            f'bools, got {adapter_only!r}, {verify_base!r}')
        self.adapter_only = adapter_only
        self.verify_base = verify_base

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        if not self.adapter_only:
            return
        dropped = strip_frozen_base(runner.model, checkpoint)
        if not dropped:
            runner.logger.warning('LoRACheckpointHook: no frozen base parameter found; '
                                  'the checkpoint is complete')

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        filled = restore_frozen_base(runner.model, checkpoint, verify=self.verify_base)
        if filled:
            runner.logger.info(f'LoRACheckpointHook: adapter-only checkpoint, {len(filled)} '
                               'frozen base tensors taken from the initialised model')
