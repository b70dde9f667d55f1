"""What an adapter of a model holds, and fingerprints of the frozen base it fits.

One definition (:func:`adapter_state_keys`) decides what :func:`save_adapter` writes, what
a strict :func:`load_adapter` requires and what the bank swaps, so the three always agree.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from eomt_mm.utils.model import unwrap_model
from ..config import LORA_CONFIG_ATTR
from ..layer import LoRALinear
from ..matching import under_prefixes

__all__ = [
    'KIND_LORA', 'KIND_TRAINABLE', 'KIND_BUFFER', 'MAX_LISTED', 'ScaleState',
    'AdapterMismatchError', 'lora_layers', 'adapter_state_keys', 'frozen_base_keys',
    'base_trainable_keys', 'tensor_fingerprint', 'fingerprints_match', 'base_fingerprints',
    'merged_weight_keys', 'live_tensors', 'current_values', 'layer_entry', 'layer_slices',
    'layer_scale_state', 'set_layer_scale_state', 'recorded_lora_config'
]

KIND_LORA = 'lora'
KIND_TRAINABLE = 'trainable'
KIND_BUFFER = 'buffer'

# Error messages list at most this many offending entries, then a count.
MAX_LISTED = 20

# (alpha, use_rslora, scaling) of one LoRALinear.
ScaleState = Tuple[float, bool, float]


class AdapterMismatchError(ValueError):
    """An adapter does not fit the model it is loaded into (rank, targets or shapes)."""


def lora_layers(model: nn.Module) -> Dict[str, LoRALinear]:
    """All :class:`LoRALinear` modules of ``model`` by qualified name (wrappers unwrapped).

    Args:
        model (nn.Module): A model or model wrapper.

    Returns:
        dict[str, LoRALinear]: Layers in model order.
    """
    model = unwrap_model(model)
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


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
    model = unwrap_model(model)
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


def live_tensors(model: nn.Module) -> Dict[str, torch.Tensor]:
    """state-dict key -> live parameter / buffer object (not a copy).

    Args:
        model (nn.Module): A model or model wrapper.

    Returns:
        dict[str, torch.Tensor]: The model's own tensors.
    """
    return dict(unwrap_model(model).state_dict(keep_vars=True))


def current_values(model: nn.Module, keys: Sequence[str]) -> Dict[str, torch.Tensor]:
    """Detached copies of the live tensors under ``keys``.

    Args:
        model (nn.Module): A model or model wrapper.
        keys (Sequence[str]): State-dict keys.

    Returns:
        dict[str, torch.Tensor]: key -> copy.
    """
    live = live_tensors(model)
    return {k: live[k].detach().clone() for k in keys}


def layer_slices(layer: LoRALinear) -> Optional[List[bool]]:
    """The layer's ``enable_slices`` as a JSON-able list, or None."""
    slices = getattr(layer, 'enable_slices', None)
    return None if slices is None else [bool(s) for s in slices]


def layer_entry(layer: LoRALinear) -> Dict[str, Any]:
    """The layout of one LoRALinear as stored in ``adapter_config.json``.

    Args:
        layer (LoRALinear): The layer.

    Returns:
        dict: Features, rank, alpha, rsLoRA switch, scaling, slices and bias flag.
    """
    return dict(
        in_features=int(layer.in_features),
        out_features=int(layer.out_features),
        rank=int(layer.rank),
        alpha=float(layer.alpha),
        use_rslora=bool(layer.use_rslora),
        scaling=float(layer.scaling),
        enable_slices=layer_slices(layer),
        bias=layer.bias is not None)


def layer_scale_state(layer: LoRALinear) -> ScaleState:
    """``(alpha, use_rslora, scaling)`` of ``layer``."""
    return float(layer.alpha), bool(layer.use_rslora), float(layer.scaling)


def set_layer_scale_state(layer: LoRALinear, state: ScaleState) -> None:
    """Give ``layer`` the ``(alpha, use_rslora, scaling)`` of an adapter.

    Args:
        layer (LoRALinear): The live layer.
        state (tuple): As returned by :func:`layer_scale_state`.
    """
    # alpha / use_rslora are part of an adapter (an adapter trained with another alpha
    # on the same rank fits the same matrices), so they travel with it on a switch.
    layer.alpha, layer.use_rslora, layer.scaling = state


def recorded_lora_config(model: nn.Module) -> Optional[dict]:
    """The lora_config recorded on the model by ``apply_lora``, if any.

    Args:
        model (nn.Module): A model or model wrapper.

    Returns:
        dict | None: A copy of the plain-dict config.
    """
    cfg = getattr(unwrap_model(model), LORA_CONFIG_ATTR, None)
    return dict(cfg) if isinstance(cfg, Mapping) else None


def _base_prefixes(model: nn.Module) -> List[str]:
    cfg = recorded_lora_config(model)
    prefixes = cfg.get('base_prefixes') if cfg else None
    return list(prefixes) if prefixes else ['']


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
    model = unwrap_model(model)
    prefixes = _base_prefixes(model)
    return [
        k for k, v in model.state_dict(keep_vars=True).items()
        if isinstance(v, nn.Parameter) and not v.requires_grad
        and under_prefixes(k, prefixes)
    ]


def base_trainable_keys(model: nn.Module) -> List[str]:
    """Adapter entries inside the pretrained base that are not LoRA matrices.

    These are trainable norms and the like inside the ``base_prefixes`` of the model's
    lora_config, whose base values :func:`disable_adapters` restores. Modules outside the
    base (task heads) are not part of the base model and keep the adapter's values.

    Args:
        model (nn.Module): The LoRA-injected model.

    Returns:
        list[str]: Keys in state-dict order.
    """
    prefixes = _base_prefixes(model)
    return [
        k for k, kind in adapter_state_keys(model).items()
        if kind != KIND_LORA and under_prefixes(k, prefixes)
    ]


def tensor_fingerprint(t: torch.Tensor) -> List[float]:
    """``[sum, sum of squares]`` in float64: a cheap check that a base is the same.

    Args:
        t (torch.Tensor): Any tensor.

    Returns:
        list[float]: The two sums.
    """
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

    Args:
        a (Sequence[float]): One fingerprint.
        b (Sequence[float]): The other.
        numel (int): Number of elements of the tensor.

    Returns:
        bool: True when equal within the bound.
    """
    scale = math.sqrt(max(numel, 1) * max(abs(a[1]), abs(b[1]))) + 1e-30
    return (abs(a[0] - b[0]) <= 1e-6 * scale
            and abs(a[1] - b[1]) <= 1e-6 * max(abs(a[1]), abs(b[1])) + 1e-30)


def merged_weight_keys(model: nn.Module) -> set:
    """Weight keys of merged layers (they hold W0 + delta, not the base)."""
    return {_join(n, 'weight') for n, m in lora_layers(model).items() if m.merged}


def base_fingerprints(model: nn.Module) -> Dict[str, List[float]]:
    """``key -> [sum, sum of squares, numel]`` of every frozen base tensor.

    Merged weights are skipped: they are not the base.

    Args:
        model (nn.Module): The LoRA-injected model.

    Returns:
        dict[str, list[float]]: Fingerprints by state-dict key.
    """
    live = live_tensors(model)
    skip = merged_weight_keys(model)
    return {
        k: tensor_fingerprint(live[k]) + [live[k].numel()]
        for k in frozen_base_keys(model) if k not in skip
    }
