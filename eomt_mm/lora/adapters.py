"""Adapter files, named adapters on one loaded base, and switching adapters off.

An *adapter* is everything a LoRA fine-tune changes on top of the frozen base model:

* the ``lora_A`` / ``lora_B`` matrices of every :class:`~eomt_mm.lora.LoRALinear`,
* every other trainable parameter (heads, queries, norm layers kept trainable),
* the persistent buffers of the modules that own trainable parameters (e.g. the running
  statistics of a trainable BatchNorm in a decode head), since they change with training
  and the outputs depend on them.

Frozen base parameters are never written: an adapter of a ViT-B at rank 8 is a few MB.
Files are ``adapter_model.safetensors`` (tensors) + ``adapter_config.json`` (layout and the
``lora_config``); nothing is ever unpickled.

Named adapters live in a small bank attached to the model (a plain attribute, so it is not
part of ``state_dict``): :func:`load_adapter` stores one under a name, :func:`set_adapter`
copies a stored one into the live parameters (keeping the previously active adapter's
current values, so training one adapter and switching back keeps its training), and
:func:`disable_adapters` temporarily restores the base model's behaviour exactly.

PEFT keeps one parameter set per adapter inside each layer; we keep one live set and swap
values instead, because the optimizer, DDP and mmengine checkpoints all hold references to
the live ``lora_A`` / ``lora_B`` parameters, which must therefore never be replaced.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import os.path as osp
import tempfile
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper

from .config import LORA_CONFIG_ATTR
from .layer import LoRALinear

__all__ = [
    'save_adapter', 'load_adapter', 'set_adapter', 'add_adapter', 'list_adapters',
    'active_adapter', 'delete_adapter', 'disable_adapters', 'snapshot_base',
    'read_adapter', 'is_adapter_path', 'adapter_state_keys', 'lora_layers',
    'frozen_base_keys', 'tensor_fingerprint', 'fingerprints_match', 'unwrap_model',
    'AdapterMismatchError'
]

ADAPTER_WEIGHTS_NAME = 'adapter_model.safetensors'
ADAPTER_CONFIG_NAME = 'adapter_config.json'
ADAPTER_FORMAT = 'eomt_mm.lora_adapter'
ADAPTER_FORMAT_VERSION = 1

ADAPTER_BANK_ATTR = '_eomt_mm_adapter_bank'

KIND_LORA = 'lora'
KIND_TRAINABLE = 'trainable'
KIND_BUFFER = 'buffer'

# Error messages list at most this many offending entries, then a count.
_MAX_LISTED = 20


class AdapterMismatchError(ValueError):
    """An adapter does not fit the model it is loaded into (rank, targets or shapes)."""


# --------------------------------------------------------------------------------------
# model inspection
# --------------------------------------------------------------------------------------
def unwrap_model(model: nn.Module) -> nn.Module:
    """Return the bare model inside DDP / mmengine model wrappers."""
    if not isinstance(model, nn.Module):
        raise TypeError(f'expected an nn.Module, got {type(model).__name__}')
    return model.module if is_model_wrapper(model) else model


_unwrap = unwrap_model


def lora_layers(model: nn.Module) -> Dict[str, LoRALinear]:
    """All :class:`LoRALinear` modules of ``model`` by qualified name (wrappers unwrapped)."""
    model = _unwrap(model)
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _layer_rank(layer: LoRALinear) -> int:
    return int(layer.rank)


def _layer_slices(layer: LoRALinear) -> Optional[List[bool]]:
    slices = getattr(layer, 'enable_slices', None)
    return None if slices is None else [bool(s) for s in slices]


def _join(prefix: str, name: str) -> str:
    return f'{prefix}.{name}' if prefix else name


def adapter_state_keys(model: nn.Module) -> Dict[str, str]:
    """The state-dict keys an adapter of ``model`` holds, each with its kind.

    Kinds: ``'lora'`` (``lora_A`` / ``lora_B`` of every LoRALinear, trainable or not),
    ``'trainable'`` (every other parameter with ``requires_grad``) and ``'buffer'``
    (persistent buffers of modules that directly own a trainable parameter). The same
    definition decides what :func:`save_adapter` writes and what a strict
    :func:`load_adapter` requires, so the two always agree.

    Args:
        model (nn.Module): The (LoRA-injected) model; model wrappers are unwrapped.

    Returns:
        dict[str, str]: key -> kind, in ``state_dict`` order.
    """
    model = _unwrap(model)
    keys: Dict[str, str] = {}
    # remove_duplicate=False: a module shared under two names appears in state_dict twice.
    for prefix, module in model.named_modules(remove_duplicate=False):
        owns_trainable = False
        for pname, param in module._parameters.items():
            if param is None:
                continue
            key = _join(prefix, pname)
            if isinstance(module, LoRALinear) and pname in ('lora_A', 'lora_B'):
                keys[key] = KIND_LORA
                owns_trainable = owns_trainable or param.requires_grad
            elif param.requires_grad:
                keys[key] = KIND_TRAINABLE
                owns_trainable = True
        if owns_trainable:
            non_persistent = getattr(module, '_non_persistent_buffers_set', set())
            for bname, buf in module._buffers.items():
                if buf is not None and bname not in non_persistent:
                    keys[_join(prefix, bname)] = KIND_BUFFER
    # Keep the state_dict order so files are deterministic.
    order = {k: i for i, k in enumerate(model.state_dict(keep_vars=True).keys())}
    return dict(sorted(keys.items(), key=lambda kv: order.get(kv[0], len(order))))


def _live_tensors(model: nn.Module) -> Dict[str, torch.Tensor]:
    """state-dict key -> live parameter / buffer object (not a copy)."""
    return dict(_unwrap(model).state_dict(keep_vars=True))


def _layer_entry(layer: LoRALinear) -> Dict[str, Any]:
    return dict(
        in_features=int(layer.in_features),
        out_features=int(layer.out_features),
        rank=_layer_rank(layer),
        alpha=float(layer.alpha),
        use_rslora=bool(layer.use_rslora),
        scaling=float(layer.scaling),
        enable_slices=_layer_slices(layer),
        bias=layer.bias is not None)


def _layer_scale_state(layer: LoRALinear) -> Tuple[float, bool, float]:
    return float(layer.alpha), bool(layer.use_rslora), float(layer.scaling)


def _set_layer_scale_state(layer: LoRALinear, state: Tuple[float, bool, float]) -> None:
    # alpha / use_rslora are part of an adapter (an adapter trained with another alpha
    # on the same rank fits the same matrices), so they travel with it on a switch.
    layer.alpha, layer.use_rslora, layer.scaling = state


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


def _model_lora_config(model: nn.Module) -> Optional[dict]:
    """The lora_config recorded on the model by ``apply_lora``, if any."""
    cfg = getattr(_unwrap(model), LORA_CONFIG_ATTR, None)
    return dict(cfg) if isinstance(cfg, Mapping) else None


def _base_prefixes(model: nn.Module) -> List[str]:
    cfg = _model_lora_config(model)
    prefixes = cfg.get('base_prefixes') if cfg else None
    return list(prefixes) if prefixes else ['']


def _under(key: str, prefixes: Sequence[str]) -> bool:
    return any(p == '' or key == p or key.startswith(p + '.') for p in prefixes)


def frozen_base_keys(model: nn.Module) -> List[str]:
    """State-dict keys of the frozen parameters of the pretrained base.

    A key is selected when its tensor is an ``nn.Parameter`` with
    ``requires_grad=False`` and lies under one of the model's ``base_prefixes`` (the
    whole model when no lora_config was recorded). Buffers are never selected (they are
    small and some, like BatchNorm statistics, change while the parameters stay frozen).

    Args:
        model (nn.Module): The model (wrappers are unwrapped).

    Returns:
        list[str]: Keys in state-dict order.
    """
    model = _unwrap(model)
    prefixes = _base_prefixes(model)
    return [
        k for k, v in model.state_dict(keep_vars=True).items()
        if isinstance(v, nn.Parameter) and not v.requires_grad and _under(k, prefixes)
    ]


def tensor_fingerprint(t: torch.Tensor) -> List[float]:
    """``[sum, sum of squares]`` in float64: a cheap check that a base is the same."""
    t = t.detach()
    if not t.is_floating_point():
        t = t.to(torch.float64)
    # float64 accumulation without materialising a float64 copy of a large weight.
    return [float(t.sum(dtype=torch.float64)),
            float(torch.linalg.vector_norm(t, dtype=torch.float64))**2]


def fingerprints_match(a: Sequence[float], b: Sequence[float], numel: int) -> bool:
    """Whether two :func:`tensor_fingerprint` results describe the same tensor.

    Reduction order differs across devices, so instead of bit equality the bound scales
    with the tensor's magnitude (``|sum| <= sqrt(numel * sumsq)``).
    """
    scale = math.sqrt(max(numel, 1) * max(abs(a[1]), abs(b[1]))) + 1e-30
    return (abs(a[0] - b[0]) <= 1e-6 * scale
            and abs(a[1] - b[1]) <= 1e-6 * max(abs(a[1]), abs(b[1])) + 1e-30)


# --------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------
def _atomic_write(path: str, write) -> None:
    """Write through a temporary file in the same folder, then rename over ``path``."""
    folder = osp.dirname(osp.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix='.tmp_', dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if osp.exists(tmp):
            os.remove(tmp)
        raise


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
    from safetensors.torch import save_file

    model = _unwrap(model)
    layers = lora_layers(model)
    if not layers:
        raise ValueError('save_adapter: the model has no LoRALinear layer; inject LoRA '
                         'with apply_lora(model, lora_config) before saving an adapter')
    keys = adapter_state_keys(model)
    live = _live_tensors(model)
    tensors = {k: live[k].detach().to('cpu').contiguous().clone() for k in keys}
    if lora_config is None:
        lora_config = _model_lora_config(model)
    config = dict(
        format=ADAPTER_FORMAT,
        format_version=ADAPTER_FORMAT_VERSION,
        lora_config=_jsonable(lora_config) if lora_config is not None else None,
        layers={name: _layer_entry(layer) for name, layer in layers.items()},
        base_fingerprints=_base_fingerprints(model),
        tensors={
            k: dict(kind=kind, shape=list(tensors[k].shape),
                    dtype=str(tensors[k].dtype).replace('torch.', ''))
            for k, kind in keys.items()
        },
        metadata=_jsonable(dict(metadata)) if metadata else {},
    )
    os.makedirs(save_dir, exist_ok=True)
    _atomic_write(
        osp.join(save_dir, ADAPTER_WEIGHTS_NAME),
        lambda p: save_file(tensors, p, metadata={'format': ADAPTER_FORMAT}))

    def _write_json(p: str) -> None:
        with open(p, 'w') as f:
            json.dump(config, f, indent=2)
            f.write('\n')

    _atomic_write(osp.join(save_dir, ADAPTER_CONFIG_NAME), _write_json)
    return save_dir


def _merged_weight_keys(model: nn.Module) -> set:
    # A merged layer's weight holds W0 + delta, not the base: never fingerprinted.
    return {_join(n, 'weight') for n, m in lora_layers(model).items() if m.merged}


def _base_fingerprints(model: nn.Module) -> Dict[str, List[float]]:
    live = _live_tensors(model)
    skip = _merged_weight_keys(model)
    return {
        k: tensor_fingerprint(live[k]) + [live[k].numel()]
        for k in frozen_base_keys(model) if k not in skip
    }


def _check_base(model: nn.Module, config: Mapping[str, Any], check_base: str,
                source: str) -> None:
    recorded = config.get('base_fingerprints') or {}
    if check_base == 'ignore' or not recorded:
        return
    live = _live_tensors(model)
    skip = _merged_weight_keys(model)
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


def _resolve_adapter_paths(path: str) -> Tuple[str, str]:
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


def read_adapter(path: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Read an adapter folder without a model: ``(tensors, config)``.

    Args:
        path (str): Adapter folder (or the path of one of its two files).

    Returns:
        tuple: CPU tensors by state-dict key, and the parsed ``adapter_config.json``.
    """
    from safetensors.torch import load_file

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
    tensors = load_file(weights_path, device='cpu')
    listed, stored = set(config['tensors']), set(tensors)
    if listed != stored:
        raise ValueError(
            f'adapter {path!r} is inconsistent: tensors listed in {ADAPTER_CONFIG_NAME} '
            f'but not stored: {sorted(listed - stored)[:_MAX_LISTED]}; stored but not '
            f'listed: {sorted(stored - listed)[:_MAX_LISTED]}')
    for key, info in config['tensors'].items():
        if list(tensors[key].shape) != list(info.get('shape', [])):
            raise ValueError(f'adapter {path!r} is inconsistent: tensor {key!r} has shape '
                             f'{list(tensors[key].shape)} but the config says '
                             f'{info.get("shape")}')
    return tensors, config


# --------------------------------------------------------------------------------------
# validation against a model
# --------------------------------------------------------------------------------------
def _format_problems(source: str, problems: Sequence[str]) -> str:
    shown = list(problems[:_MAX_LISTED])
    more = len(problems) - len(shown)
    lines = '\n  - '.join(shown)
    tail = f'\n  ... and {more} more' if more > 0 else ''
    return (f'adapter {source} does not fit this model ({len(problems)} problem(s)):\n'
            f'  - {lines}{tail}\nBuild the base model with the adapter\'s lora_config '
            '(stored in its adapter_config.json) before loading it.')


def _check_fit(model: nn.Module, tensors: Mapping[str, torch.Tensor],
               config: Mapping[str, Any], strict: bool, source: str) -> None:
    model = _unwrap(model)
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
        rank = _layer_rank(layer)
        if int(entry.get('rank', -1)) != rank:
            problems.append(f'layer {name!r}: adapter rank {entry.get("rank")} but model '
                            f'rank {rank}')
        for dim in ('in_features', 'out_features'):
            if int(entry.get(dim, -1)) != int(getattr(layer, dim)):
                problems.append(f'layer {name!r}: adapter {dim}={entry.get(dim)} but model '
                                f'{dim}={getattr(layer, dim)}')
        if entry.get('enable_slices') != _layer_slices(layer):
            problems.append(f'layer {name!r}: adapter enable_slices='
                            f'{entry.get("enable_slices")} but model enable_slices='
                            f'{_layer_slices(layer)}')
    if strict:
        missing_layers = sorted(set(layers) - set(config['layers']))
        for name in missing_layers:
            problems.append(f'model LoRA layer {name!r} is not in the adapter')

    expected = adapter_state_keys(model)
    live = _live_tensors(model)
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


# --------------------------------------------------------------------------------------
# the bank of named adapters
# --------------------------------------------------------------------------------------
class _Bank:
    """Named adapters of one model: tensors, per-layer (alpha, rslora, scaling), configs."""

    def __init__(self) -> None:
        self.adapters: Dict[str, Dict[str, Any]] = {}
        self.active: Optional[str] = None
        self.base: Optional[Dict[str, torch.Tensor]] = None


def _bank(model: nn.Module, create: bool = True) -> Optional[_Bank]:
    model = _unwrap(model)
    bank = model.__dict__.get(ADAPTER_BANK_ATTR)
    if bank is None and create:
        bank = _Bank()
        # Plain attribute (not a submodule / buffer): stays out of state_dict.
        object.__setattr__(model, ADAPTER_BANK_ATTR, bank)
    return bank


def _base_trainable_keys(model: nn.Module) -> List[str]:
    """Adapter entries inside the pretrained base (``base_prefixes`` of the model's
    lora_config) that are not LoRA matrices: trainable norms and the like, whose base
    values :func:`disable_adapters` restores. Modules outside the base (task heads) are
    not part of the base model and keep the adapter's values."""
    prefixes = _base_prefixes(model)
    return [
        k for k, kind in adapter_state_keys(model).items()
        if kind != KIND_LORA and _under(k, prefixes)
    ]


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
    live = _live_tensors(model)
    keys = _base_trainable_keys(model)
    _bank(model).base = {k: live[k].detach().clone() for k in keys}
    return keys


def _copy_into_model(model: nn.Module, tensors: Mapping[str, torch.Tensor],
                     scales: Mapping[str, Tuple[float, bool, float]]) -> None:
    """Copy adapter values into live tensors; merged layers are unmerged around it."""
    layers = lora_layers(model)
    live = _live_tensors(model)
    merged = [layer for layer in layers.values() if layer.merged]
    with torch.no_grad():
        for layer in merged:
            layer.unmerge()
        try:
            for key, value in tensors.items():
                live[key].copy_(value)
            for name, state in scales.items():
                _set_layer_scale_state(layers[name], state)
        finally:
            for layer in merged:
                layer.merge()


def _current_values(model: nn.Module, keys: Sequence[str]) -> Dict[str, torch.Tensor]:
    live = _live_tensors(model)
    return {k: live[k].detach().clone() for k in keys}


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
    _check_fit(model, tensors, config, strict, repr(path))
    _check_base(model, config, check_base, repr(path))
    bank = _bank(model)
    if bank.base is None:
        snapshot_base(model)
    # Fill the keys a non-strict adapter lacks so every stored adapter is complete and
    # switching never leaves another adapter's values behind.
    full = _current_values(model, list(adapter_state_keys(model)))
    live = _live_tensors(model)
    for key, value in tensors.items():
        full[key] = value.to(dtype=live[key].dtype, device=live[key].device)
    layers = lora_layers(model)
    scales = {}
    for name, entry in config['layers'].items():
        alpha, rslora, scaling = _layer_scale_state(layers[name])
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
    bank = _bank(model, create=False)
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
    bank = _bank(model)
    entry = bank.adapters.setdefault(adapter_name, dict(config=None, source=None))
    # Also the extra (frozen-in-this-model) keys a non-strict adapter brought along.
    own = adapter_state_keys(model)
    keys = list(own) + [k for k in entry.get('tensors', {}) if k not in own]
    entry['tensors'] = _current_values(model, keys)
    entry['scales'] = {name: _layer_scale_state(layer)
                       for name, layer in lora_layers(model).items()}


def add_adapter(model: nn.Module, adapter_name: str) -> None:
    """Store the model's current adapter values (e.g. just trained) under a name.

    Args:
        model (nn.Module): The LoRA-injected model.
        adapter_name (str): Name to store the current values under; becomes active.
    """
    if not lora_layers(model):
        raise ValueError('add_adapter: the model has no LoRALinear layer')
    bank = _bank(model)
    _store_live(model, adapter_name)
    bank.active = adapter_name


def list_adapters(model: nn.Module) -> List[str]:
    """Names of the adapters stored on ``model``."""
    bank = _bank(model, create=False)
    return sorted(bank.adapters) if bank else []


def active_adapter(model: nn.Module) -> Optional[str]:
    """Name of the active adapter, or None when none was loaded / set."""
    bank = _bank(model, create=False)
    return bank.active if bank else None


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Forget a stored adapter (the live values are left as they are)."""
    bank = _bank(model, create=False)
    if bank is None or adapter_name not in bank.adapters:
        raise KeyError(f'no adapter named {adapter_name!r} on this model; loaded: '
                       f'{list_adapters(model)}')
    del bank.adapters[adapter_name]
    if bank.active == adapter_name:
        bank.active = None


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Context manager: inside it, ``model`` computes the base model's outputs exactly.

    Every LoRALinear gets ``adapter_enabled=False``: unmerged layers then compute exactly
    ``F.linear(x, W0, b)``. Merged layers are unmerged for the duration (their base weight
    is then W0 up to fp32 rounding, ~1e-7 relative, since ``unmerge`` subtracts the delta)
    and their merged weights are restored bit-exactly on exit. Trainable entries
    inside the base (``base_prefixes``) that are not LoRA matrices (e.g. backbone norms
    kept trainable) are swapped to the base values recorded by :func:`snapshot_base`
    (taken automatically by the first :func:`load_adapter`); if no snapshot exists they
    stay as they are and a warning names them. Modules outside the base (task heads) keep
    their values. Everything is restored on exit, also after an exception.

    Args:
        model (nn.Module): The LoRA-injected model (wrappers are unwrapped).

    Yields:
        nn.Module: ``model``.
    """
    layers = list(lora_layers(model).values())
    bank = _bank(model, create=False)
    live = _live_tensors(model)
    base = bank.base if bank is not None and bank.base is not None else None
    if base is None:
        unsnapshotted = [k for k in _base_trainable_keys(model) if k in live]
        if unsnapshotted:
            print_log(
                'disable_adapters: no base snapshot of the trainable non-LoRA entries '
                f'{unsnapshotted[:_MAX_LISTED]}; they keep their current values. Call '
                'snapshot_base(model) after loading the pretrained weights to restore '
                'them too.', logger='current', level=30)
    flags = [(layer, layer.adapter_enabled) for layer in layers]
    merged_weights: List[Tuple[LoRALinear, torch.Tensor]] = []
    swapped: Dict[str, torch.Tensor] = {}
    try:
        with torch.no_grad():
            for layer in layers:
                if layer.merged:
                    # unmerge() restores W0 only up to rounding; keep the merged weight
                    # to put it back bit-exactly on exit.
                    merged_weights.append((layer, layer.weight.detach().clone()))
                    layer.unmerge()
                layer.adapter_enabled = False
            if base is not None:
                for key, value in base.items():
                    if key in live:
                        swapped[key] = live[key].detach().clone()
                        live[key].copy_(value)
        yield model
    finally:
        with torch.no_grad():
            for key, value in swapped.items():
                live[key].copy_(value)
            for layer, enabled in flags:
                layer.adapter_enabled = enabled
            for layer, weight in merged_weights:
                layer.merge()
                layer.weight.copy_(weight)
