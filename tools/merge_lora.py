#!/usr/bin/env python
"""Fold a trained LoRA into its base weights: ``merge_lora.py CONFIG CHECKPOINT OUT``.

CONFIG is the training config (the model with its ``lora_config``: a ``WithLoRA`` model or
a model taking ``lora_config``). CHECKPOINT is one of

* an mmengine checkpoint (``{'state_dict': ..., 'meta': ..., ...}``), complete or
  adapter-only (written with ``LoRACheckpointHook``; the frozen base then comes from the
  config's pretrained ``init_cfg``, checked against the fingerprints the hook recorded);
* a plain state dict (every value a tensor);
* an adapter folder written by ``eomt_mm.lora.save_adapter`` (base from ``init_cfg``).

Files are read with ``torch.load(weights_only=True)`` or safetensors; nothing is
unpickled. OUT gets ``dict(state_dict=..., meta=...)`` whose state dict has exactly the
keys of the same model built without LoRA (checked against that model unless
``--no-verify``), written to a temporary file and renamed, so an existing OUT is never
left half-written. Exit status 1 with a message when the checkpoint does not fit.
"""
from __future__ import annotations

import argparse
import copy
import json
import os.path as osp
import pickle
import sys
from typing import Any, Dict, Mapping, Optional, Sequence

import torch
from mmengine.config import Config, DictAction
from mmengine.registry import init_default_scope
from mmengine.runner import set_random_seed
from mmengine.utils import import_modules_from_strings
from mmseg.registry import MODELS

import eomt_mm  # noqa: F401  (registers WithLoRA, LoRALinear, the models)
from eomt_mm.engine.checkpoint import load_checkpoint_weights_only
from eomt_mm.engine.hooks.lora_checkpoint_hook import (is_adapter_only_checkpoint,
                                                       restore_frozen_base)
from eomt_mm.engine.lora_record import (LoRAConfigMismatchError, check_lora_config,
                                        recorded_checkpoint_lora_config)
from eomt_mm.engine.safe_checkpoint import install_safe_checkpointing
from eomt_mm.lora import merge_lora
from eomt_mm.lora.adapters import is_adapter_path, lora_layers, load_adapter
from eomt_mm.lora.adapters.state import layer_scale_state, set_layer_scale_state
from eomt_mm.lora.config import LORA_CONFIG_ATTR
from eomt_mm.utils.io import atomic_write

_MAX_LISTED = 10


class MergeError(RuntimeError):
    """The inputs cannot be merged (message says why)."""


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description='Fold LoRA into the base weights and write a plain checkpoint that '
        'loads into the model built without LoRA.')
    parser.add_argument('config', help='training config file (model with lora_config)')
    parser.add_argument('checkpoint', help='mmengine checkpoint, plain state dict, or '
                        'adapter folder (adapter_model.safetensors + adapter_config.json)')
    parser.add_argument('out', help='output checkpoint path (.pth)')
    parser.add_argument('--device', default='cpu', help='device for merging (default cpu)')
    parser.add_argument('--no-verify', action='store_true',
                        help='skip building the model without LoRA to check the keys')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, default={},
                        metavar='KEY=VALUE', help='override config entries')
    parser.add_argument('--lora-from-config', action='store_true',
                        help="use the config's lora_config even where the checkpoint or "
                        'adapter was trained with other LoRA settings (lora_alpha, '
                        'use_rslora, rank, targets, ...); without it they are refused')
    return parser.parse_args(argv)


def without_lora(model_cfg: Any) -> Any:
    """The model config with LoRA removed: ``WithLoRA`` nodes replaced by their inner
    model, every ``lora_config`` set to None (recursively, so a backbone-level
    ``lora_config`` is handled too)."""
    if isinstance(model_cfg, Mapping):
        if model_cfg.get('type') == 'WithLoRA':
            if 'model' not in model_cfg:
                raise MergeError("a 'WithLoRA' model config has no 'model' entry")
            return without_lora(model_cfg['model'])
        return {
            k: None if k == 'lora_config' else without_lora(v)
            for k, v in model_cfg.items()
        }
    if isinstance(model_cfg, (list, tuple)):
        return type(model_cfg)(without_lora(v) for v in model_cfg)
    return model_cfg


def build_model(model_cfg: Any) -> torch.nn.Module:
    return MODELS.build(copy.deepcopy(model_cfg))


def _strip_module_prefix(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    # mmengine strips DDP's 'module.' on load (revise_keys default); do the same.
    if state_dict and all(k.startswith('module.') for k in state_dict):
        return {k[len('module.'):]: v for k, v in state_dict.items()}
    return state_dict


def _check_state_dict(model: torch.nn.Module, state_dict: Mapping[str, Any],
                      what: str) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [
        f'{k}: checkpoint {list(state_dict[k].shape)} vs model {list(expected[k].shape)}'
        for k in expected
        if k in state_dict and isinstance(state_dict[k], torch.Tensor)
        and state_dict[k].shape != expected[k].shape
    ]
    not_tensor = [k for k in state_dict if not isinstance(state_dict[k], torch.Tensor)]
    problems = []
    if missing:
        problems.append(f'missing keys ({len(missing)}): {missing[:_MAX_LISTED]}')
    if unexpected:
        problems.append(f'unexpected keys ({len(unexpected)}): {unexpected[:_MAX_LISTED]}')
    if wrong:
        problems.append(f'shape mismatches ({len(wrong)}): {wrong[:_MAX_LISTED]}')
    if not_tensor:
        problems.append(f'non-tensor values: {not_tensor[:_MAX_LISTED]}')
    if problems:
        raise MergeError(f'{what} does not fit the model built from the config:\n  ' +
                         '\n  '.join(problems))


def _check_lora_settings(model: torch.nn.Module, trained: Optional[Mapping], source: str,
                         lora_from_config: bool) -> None:
    """Refuse weights trained with other LoRA settings than the model's (unless told)."""
    if lora_from_config:
        return
    try:
        check_lora_config(trained, getattr(model, LORA_CONFIG_ATTR, None), source,
                          '--lora-from-config')
    except LoRAConfigMismatchError as err:
        raise MergeError(str(err)) from None


def load_into(model: torch.nn.Module, checkpoint_path: str,
              lora_from_config: bool = False) -> str:
    """Load CHECKPOINT into the LoRA model; returns a description of what was loaded.

    Args:
        model: The model built from the config, with LoRA.
        checkpoint_path: An mmengine checkpoint, a state dict or an adapter folder.
        lora_from_config: Use the config's LoRA settings even where the checkpoint or
            adapter records others (otherwise refused).
    """
    if is_adapter_path(checkpoint_path):
        # The adapter carries no base weights: they come from the config's init_cfg.
        model.init_weights()
        config_scales = {name: layer_scale_state(layer)
                         for name, layer in lora_layers(model).items()}
        try:
            adapter_config = load_adapter(model, checkpoint_path, strict=True,
                                          check_base='error')
        except ValueError as err:
            raise MergeError(str(err)) from None
        trained = adapter_config.get('lora_config')
        if trained is not None:
            _check_lora_settings(model, trained, f'adapter {checkpoint_path!r}',
                                 lora_from_config)
        if lora_from_config:
            # load_adapter takes each layer's alpha / rslora from the adapter; the flag
            # says the config's values are wanted.
            layers = lora_layers(model)
            for name, state in config_scales.items():
                set_layer_scale_state(layers[name], state)
        return 'adapter'
    if not osp.isfile(checkpoint_path):
        raise MergeError(f'checkpoint {checkpoint_path!r} is neither a file nor an adapter '
                         'folder')
    obj = load_checkpoint_weights_only(checkpoint_path, map_location='cpu')
    if isinstance(obj, Mapping) and 'state_dict' in obj:
        state_dict = obj['state_dict']
        kind = 'mmengine checkpoint'
    elif isinstance(obj, Mapping) and obj and all(
            isinstance(v, torch.Tensor) for v in obj.values()):
        state_dict, kind = obj, 'state dict'
    else:
        keys = sorted(obj)[:_MAX_LISTED] if isinstance(obj, Mapping) else type(obj).__name__
        raise MergeError(f'{checkpoint_path!r} is neither an mmengine checkpoint (a dict '
                         f"with 'state_dict') nor a state dict of tensors (got {keys})")
    if not isinstance(state_dict, Mapping):
        raise MergeError(f"{checkpoint_path!r}: 'state_dict' is a "
                         f'{type(state_dict).__name__}, expected a dict of tensors')
    recorded, trained = recorded_checkpoint_lora_config(obj)
    if recorded:
        _check_lora_settings(model, trained, f'checkpoint {checkpoint_path!r}',
                             lora_from_config)
    state_dict = _strip_module_prefix(dict(state_dict))
    if is_adapter_only_checkpoint(obj):
        model.init_weights()
        obj = dict(obj, state_dict=state_dict)
        try:
            restore_frozen_base(model, obj, verify=True)
        except RuntimeError as err:
            raise MergeError(str(err)) from None
        state_dict = obj['state_dict']
        kind = 'adapter-only mmengine checkpoint'
    _check_state_dict(model, state_dict, f'checkpoint {checkpoint_path!r}')
    model.load_state_dict(state_dict, strict=True)
    return kind


def save_atomic(obj: Any, out: str) -> None:
    """torch.save to a temporary file next to ``out``, then rename over it."""
    atomic_write(out, lambda tmp: torch.save(obj, tmp))


def merge(config: str, checkpoint: str, out: str, device: str = 'cpu',
          verify: bool = True, cfg_options: Optional[Mapping] = None,
          lora_from_config: bool = False) -> Dict[str, Any]:
    """Build, load, merge, check and write; returns the written ``meta``.

    Args:
        config: The training config.
        checkpoint: An mmengine checkpoint, a state dict or an adapter folder.
        out: The merged checkpoint to write.
        device: Device to merge on.
        verify: Check the merged keys against the model built without LoRA.
        cfg_options: ``--cfg-options`` overrides.
        lora_from_config: Use the config's LoRA settings even where the checkpoint or
            adapter records others (otherwise they are refused).
    """
    # init_cfg=dict(type='Pretrained') loads the base through mmengine: weights only.
    install_safe_checkpointing()
    if not osp.isfile(config):
        raise MergeError(f'config file {config!r} does not exist')
    if osp.abspath(out) == osp.abspath(checkpoint):
        raise MergeError('OUT must differ from CHECKPOINT (it would be overwritten)')
    cfg = Config.fromfile(config)
    if cfg_options:
        cfg.merge_from_dict(dict(cfg_options))
    if cfg.get('custom_imports'):
        import_modules_from_strings(**cfg['custom_imports'])
    init_default_scope(cfg.get('default_scope', 'mmseg'))
    if 'model' not in cfg:
        raise MergeError(f'config {config!r} has no `model`')

    seed = cfg.get('randomness', {}).get('seed')
    if seed is not None:
        # As the Runner does before building: a base that is a seeded random init (no
        # pretrained init_cfg, as in the demo) is then rebuilt identically for adapters.
        set_random_seed(seed, deterministic=cfg.get('randomness', {}).get(
            'deterministic', False))
    model = build_model(cfg.model).to(device)
    n_layers = len(lora_layers(model))
    if n_layers == 0:
        raise MergeError(f'the model of {config!r} has no LoRALinear layer (no enabled '
                         'lora_config): there is nothing to merge')
    lora_cfg = getattr(model, '_lora_config', None)
    kind = load_into(model, checkpoint, lora_from_config=lora_from_config)
    model.eval()
    merge_lora(model)
    state_dict = {k: v.detach().to('cpu').contiguous() for k, v in model.state_dict().items()}
    if verify:
        plain = build_model(without_lora(cfg.model))
        _check_state_dict(plain, state_dict, 'the merged state dict (internal error)')
        del plain
    meta = dict(
        merged_from=osp.abspath(checkpoint),
        source_kind=kind,
        config=osp.abspath(config),
        merged_lora_layers=n_layers,
        lora_config=json.dumps(lora_cfg, sort_keys=True) if lora_cfg else '',
        eomt_mm_version=eomt_mm.__version__,
    )
    save_atomic(dict(state_dict=state_dict, meta=meta), out)
    return meta


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        meta = merge(args.config, args.checkpoint, args.out, device=args.device,
                     verify=not args.no_verify, cfg_options=args.cfg_options,
                     lora_from_config=args.lora_from_config)
    except (MergeError, FileNotFoundError, ValueError, RuntimeError,
            pickle.UnpicklingError) as err:
        # AdapterMismatchError (ValueError), UnsafeCheckpointError (UnpicklingError)
        # and unreadable files all end here with their own message.
        print(f'merge_lora: error: {err}', file=sys.stderr)
        return 1
    print(f'merge_lora: merged {meta["merged_lora_layers"]} LoRA layers from '
          f'{meta["source_kind"]} {args.checkpoint} -> {args.out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
