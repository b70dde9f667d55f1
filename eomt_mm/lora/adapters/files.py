"""Adapter files: writing, reading and checking that one fits a model.

An adapter folder holds ``adapter_model.safetensors`` (the tensors of
:func:`~eomt_mm.lora.adapters.state.adapter_state_keys`) and ``adapter_config.json`` (the
layout of every LoRA layer, the ``lora_config``, fingerprints of the frozen base and the
tensor list); nothing is ever unpickled. Both files are replaced atomically.
"""
from __future__ import annotations

import json
import os
import os.path as osp
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from mmengine.logging import print_log
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from eomt_mm.utils.io import atomic_write
from eomt_mm.utils.model import unwrap_model
from .state import (MAX_LISTED, AdapterMismatchError, adapter_state_keys, base_fingerprints,
                    fingerprints_match, layer_entry, layer_slices, live_tensors,
                    lora_layers, merged_weight_keys, recorded_lora_config,
                    tensor_fingerprint)

__all__ = [
    'ADAPTER_WEIGHTS_NAME', 'ADAPTER_CONFIG_NAME', 'ADAPTER_FORMAT', 'ADAPTER_FORMAT_VERSION',
    'save_adapter', 'read_adapter', 'is_adapter_path', 'check_fit', 'check_same_base'
]

ADAPTER_WEIGHTS_NAME = 'adapter_model.safetensors'
ADAPTER_CONFIG_NAME = 'adapter_config.json'
ADAPTER_FORMAT = 'eomt_mm.lora_adapter'
ADAPTER_FORMAT_VERSION = 1


def _jsonable(obj: Any) -> Any:
    """Plain JSON types from a (possibly mmengine ConfigDict) lora_config."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    raise TypeError(f'lora_config value {obj!r} of type {type(obj).__name__} cannot be '
                    'stored in adapter_config.json (expected str, number, bool, None, '
                    'list or dict)')


def save_adapter(model: nn.Module,
                 save_dir: str,
                 lora_config: Optional[Mapping] = None,
                 metadata: Optional[Mapping[str, Any]] = None) -> str:
    """Write the adapter of ``model`` (see :func:`adapter_state_keys`) to ``save_dir``.

    Creates ``save_dir/adapter_model.safetensors`` and ``save_dir/adapter_config.json``.
    Merged layers are saved with their LoRA matrices as they are (the weights are not
    touched). Existing files are replaced atomically.

    Args:
        model (nn.Module): A LoRA-injected model (wrappers are unwrapped).
        save_dir (str): Output folder, created if missing.
        lora_config (Mapping, optional): The ``lora_config`` the model was built with;
            stored so the base model can be rebuilt to fit. Defaults to the config that
            ``apply_lora`` recorded on the model, if any.
        metadata (Mapping, optional): Extra JSON-serialisable information to store.

    Returns:
        str: ``save_dir``.
    """
    model = unwrap_model(model)
    layers = lora_layers(model)
    if not layers:
        raise ValueError('save_adapter: the model has no LoRALinear layer; inject LoRA '
                         'with apply_lora(model, lora_config) before saving an adapter')
    keys = adapter_state_keys(model)
    live = live_tensors(model)
    tensors = {k: live[k].detach().to('cpu').contiguous().clone() for k in keys}
    if lora_config is None:
        lora_config = recorded_lora_config(model)
    config = dict(
        format=ADAPTER_FORMAT,
        format_version=ADAPTER_FORMAT_VERSION,
        lora_config=_jsonable(lora_config) if lora_config is not None else None,
        layers={name: layer_entry(layer) for name, layer in layers.items()},
        base_fingerprints=base_fingerprints(model),
        tensors={
            k: dict(kind=kind, shape=list(tensors[k].shape),
                    dtype=str(tensors[k].dtype).replace('torch.', ''))
            for k, kind in keys.items()
        },
        metadata=_jsonable(dict(metadata)) if metadata else {},
    )
    os.makedirs(save_dir, exist_ok=True)
    atomic_write(
        osp.join(save_dir, ADAPTER_WEIGHTS_NAME),
        lambda p: save_file(tensors, p, metadata={'format': ADAPTER_FORMAT}))

    def _write_json(p: str) -> None:
        with open(p, 'w') as f:
            json.dump(config, f, indent=2)
            f.write('\n')

    atomic_write(osp.join(save_dir, ADAPTER_CONFIG_NAME), _write_json)
    return save_dir


def _resolve_adapter_paths(path: str) -> Tuple[str, str]:
    """``(weights file, config file)`` of an adapter folder, or a FileNotFoundError."""
    if osp.isdir(path):
        folder = path
    elif osp.basename(path) in (ADAPTER_WEIGHTS_NAME, ADAPTER_CONFIG_NAME):
        folder = osp.dirname(path) or '.'
    else:
        raise FileNotFoundError(
            f'adapter path {path!r} is not a folder holding {ADAPTER_WEIGHTS_NAME} and '
            f'{ADAPTER_CONFIG_NAME} (as written by save_adapter)')
    weights = osp.join(folder, ADAPTER_WEIGHTS_NAME)
    config = osp.join(folder, ADAPTER_CONFIG_NAME)
    for p in (weights, config):
        if not osp.isfile(p):
            raise FileNotFoundError(f'adapter file {p!r} is missing; an adapter folder '
                                    f'holds {ADAPTER_WEIGHTS_NAME} and {ADAPTER_CONFIG_NAME}')
    return weights, config


def is_adapter_path(path: str) -> bool:
    """Whether ``path`` is an adapter folder (or one of its two files)."""
    try:
        _resolve_adapter_paths(path)
    except FileNotFoundError:
        return False
    return True


def _load_weights(weights_path: str) -> Dict[str, torch.Tensor]:
    """The tensors of ``adapter_model.safetensors``, refusing unreadable or non-finite ones.

    Args:
        weights_path (str): The adapter's weights file.

    Returns:
        dict: CPU tensors by state-dict key.

    Raises:
        ValueError: If the file is not a readable safetensors file (empty, truncated,
            corrupt), naming it; or if a floating-point tensor holds NaN or inf values,
            naming the tensor (such an adapter would make every output NaN).
    """
    try:
        tensors = load_file(weights_path, device='cpu')
    except SafetensorError as err:
        # safetensors' own message ("header too small", ...) does not name the file.
        raise ValueError(
            f'{weights_path}: not a readable safetensors file ({err}; '
            f'{osp.getsize(weights_path)} bytes): the adapter file is empty, truncated or '
            'corrupt. Save the adapter again with save_adapter (or copy it again).') from None
    for key, tensor in tensors.items():
        if tensor.is_floating_point() or tensor.is_complex():
            finite = torch.isfinite(tensor)
            if not bool(finite.all()):
                bad = int((~finite).sum())
                raise ValueError(
                    f'{weights_path}: adapter tensor {key!r} {list(tensor.shape)} holds '
                    f'{bad} non-finite value(s) (NaN or inf); it would make every output '
                    'NaN. The training that wrote it diverged: use an earlier adapter or '
                    'checkpoint.')
    return tensors


def read_adapter(path: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Read an adapter folder without a model: ``(tensors, config)``.

    Args:
        path (str): Adapter folder (or the path of one of its two files).

    Returns:
        tuple: CPU tensors by state-dict key, and the parsed ``adapter_config.json``.
    """
    weights_path, config_path = _resolve_adapter_paths(path)
    try:
        with open(config_path) as f:
            config = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f'{config_path}: not valid JSON ({e})') from e
    if not isinstance(config, dict) or config.get('format') != ADAPTER_FORMAT:
        raise ValueError(f'{config_path}: not an eomt_mm adapter config (expected '
                         f'"format": "{ADAPTER_FORMAT}")')
    if config.get('format_version') != ADAPTER_FORMAT_VERSION:
        raise ValueError(f'{config_path}: adapter format_version '
                         f'{config.get("format_version")!r} is not supported (this '
                         f'version reads {ADAPTER_FORMAT_VERSION})')
    for field in ('layers', 'tensors'):
        if not isinstance(config.get(field), dict):
            raise ValueError(f'{config_path}: field {field!r} missing or not an object')
    tensors = _load_weights(weights_path)
    listed, stored = set(config['tensors']), set(tensors)
    if listed != stored:
        raise ValueError(
            f'adapter {path!r} is inconsistent: tensors listed in {ADAPTER_CONFIG_NAME} '
            f'but not stored: {sorted(listed - stored)[:MAX_LISTED]}; stored but not '
            f'listed: {sorted(stored - listed)[:MAX_LISTED]}')
    for key, info in config['tensors'].items():
        if list(tensors[key].shape) != list(info.get('shape', [])):
            raise ValueError(f'adapter {path!r} is inconsistent: tensor {key!r} has shape '
                             f'{list(tensors[key].shape)} but the config says '
                             f'{info.get("shape")}')
    return tensors, config


def _format_problems(source: str, problems: Sequence[str]) -> str:
    """One error message listing at most ``MAX_LISTED`` problems, then a count."""
    shown = list(problems[:MAX_LISTED])
    more = len(problems) - len(shown)
    lines = '\n  - '.join(shown)
    tail = f'\n  ... and {more} more' if more > 0 else ''
    return (f'adapter {source} does not fit this model ({len(problems)} problem(s)):\n'
            f'  - {lines}{tail}\nBuild the base model with the adapter\'s lora_config '
            '(stored in its adapter_config.json) before loading it.')


def check_fit(model: nn.Module, tensors: Mapping[str, torch.Tensor],
              config: Mapping[str, Any], strict: bool, source: str) -> None:
    """Raise unless an adapter fits ``model`` (layers, ranks, slices, tensor shapes).

    Args:
        model (nn.Module): The LoRA-injected model (wrappers are unwrapped).
        tensors (Mapping[str, torch.Tensor]): The adapter's tensors.
        config (Mapping[str, Any]): Its parsed ``adapter_config.json``.
        strict (bool): Also require it to cover exactly the model's adapter entries.
        source (str): Where it came from, for the message.

    Raises:
        AdapterMismatchError: Naming every offending layer / key with both shapes.
    """
    model = unwrap_model(model)
    problems: List[str] = []
    layers = lora_layers(model)
    modules = dict(model.named_modules())
    for name, entry in config['layers'].items():
        layer = layers.get(name)
        if layer is None:
            other = modules.get(name)
            what = ('does not exist' if other is None else
                    f'is a {type(other).__name__}, not a LoRALinear')
            problems.append(f'adapter targets layer {name!r}, which in this model {what} '
                            f'(lora_config target_modules differ)')
            continue
        rank = int(layer.rank)
        if int(entry.get('rank', -1)) != rank:
            problems.append(f'layer {name!r}: adapter rank {entry.get("rank")} but model '
                            f'rank {rank}')
        for dim in ('in_features', 'out_features'):
            if int(entry.get(dim, -1)) != int(getattr(layer, dim)):
                problems.append(f'layer {name!r}: adapter {dim}={entry.get(dim)} but model '
                                f'{dim}={getattr(layer, dim)}')
        if entry.get('enable_slices') != layer_slices(layer):
            problems.append(f'layer {name!r}: adapter enable_slices='
                            f'{entry.get("enable_slices")} but model enable_slices='
                            f'{layer_slices(layer)}')
    if strict:
        missing_layers = sorted(set(layers) - set(config['layers']))
        for name in missing_layers:
            problems.append(f'model LoRA layer {name!r} is not in the adapter')

    expected = adapter_state_keys(model)
    live = live_tensors(model)
    for key, tensor in tensors.items():
        if key not in live:
            problems.append(f'adapter tensor {key!r} {list(tensor.shape)} has no '
                            'counterpart in the model')
            continue
        if tuple(tensor.shape) != tuple(live[key].shape):
            problems.append(f'tensor {key!r}: adapter shape {list(tensor.shape)} but model '
                            f'shape {list(live[key].shape)}')
        if tensor.is_floating_point() != live[key].is_floating_point():
            problems.append(f'tensor {key!r}: adapter dtype {tensor.dtype} cannot be copied '
                            f'into model dtype {live[key].dtype}')
        if strict and key not in expected:
            problems.append(f'adapter tensor {key!r} is a frozen (non-adapter) entry of '
                            'this model; its trainable_modules differ')
    if strict:
        for key in expected:
            if key not in tensors:
                problems.append(f'model {expected[key]} entry {key!r} '
                                f'{list(live[key].shape)} is not in the adapter')
    if problems:
        raise AdapterMismatchError(_format_problems(source, problems))


def check_same_base(model: nn.Module, config: Mapping[str, Any], check_base: str,
                    source: str) -> None:
    """Compare the model's frozen base with the fingerprints the adapter was saved with.

    Args:
        model (nn.Module): The LoRA-injected model.
        config (Mapping[str, Any]): The adapter's parsed ``adapter_config.json``.
        check_base (str): ``'warn'`` (log a warning), ``'error'`` or ``'ignore'``.
        source (str): Where the adapter came from, for the message.

    Raises:
        AdapterMismatchError: With ``check_base='error'``, if any tensor differs.
    """
    recorded = config.get('base_fingerprints') or {}
    if check_base == 'ignore' or not recorded:
        return
    live = live_tensors(model)
    skip = merged_weight_keys(model)
    differ = [
        k for k, fp in recorded.items()
        if k in live and k not in skip and live[k].numel() == int(fp[2])
        and not fingerprints_match(tensor_fingerprint(live[k]), fp[:2], int(fp[2]))
    ]
    if not differ:
        return
    msg = (f'adapter {source} was trained on another base: {len(differ)} frozen base '
           f'tensor(s) differ from the ones it was saved with, e.g. {differ[:5]}. Load '
           'the pretrained weights the adapter was trained on before the adapter.')
    if check_base == 'error':
        raise AdapterMismatchError(msg)
    print_log(msg, logger='current', level=30)
