"""Fold LoRA adapters into the base weights.

* :func:`merge_lora` turns every :class:`~eomt_mm.lora.LoRALinear` into a plain
  ``nn.Linear`` holding ``W0 + scaling * B A``: the model then has exactly the modules and
  state-dict keys of the same model built without LoRA, costs what it costs, and its
  state dict loads strictly into that model (what ``tools/merge_lora.py`` writes).
* :func:`merge_adapters` / :func:`unmerge_adapters` fold / unfold in place while keeping
  the LoRALinear layers, for fast inference that can still switch adapters.
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn as nn
from mmengine.logging import print_log

from eomt_mm.utils.model import unwrap_model
from .adapters import ADAPTER_BANK_ATTR
from .config import LORA_CONFIG_ATTR
from .layer import LoRALinear

__all__ = ['merge_lora', 'merge_adapters', 'unmerge_adapters']


def _plain_linear(layer: LoRALinear) -> nn.Linear:
    """An ``nn.Linear`` computing what ``layer`` computes now (adapter folded in)."""
    with torch.no_grad():
        if layer.merged or not layer.adapter_enabled:
            # Merged: weight already holds W0 + delta. Disabled: the layer's forward is
            # the base alone, and merging must not change what the model computes.
            weight = layer.weight.detach().clone()
        else:
            dtype = torch.promote_types(layer.weight.dtype, torch.float32)
            weight = (layer.weight.to(dtype) +
                      layer.delta_weight().to(dtype)).to(layer.weight.dtype)
        # Built on the meta device: the random init of a fresh nn.Linear is wasted work.
        linear = nn.Linear(layer.in_features, layer.out_features,
                           bias=layer.bias is not None, device='meta',
                           dtype=layer.weight.dtype)
        linear = linear.to_empty(device=layer.weight.device)
        linear.weight.copy_(weight)
        if layer.bias is not None:
            linear.bias.copy_(layer.bias.detach())
    linear.weight.requires_grad_(layer.weight.requires_grad)
    if layer.bias is not None:
        linear.bias.requires_grad_(layer.bias.requires_grad)
    linear.train(layer.training)
    return linear


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA adapter into its weight and replace LoRALinear by ``nn.Linear``.

    The model computes the same function (up to fp32 rounding of ``W0 + delta``), and
    its state dict has the keys of the model built without LoRA. Layers whose adapter is
    disabled become ``nn.Linear`` with their base weights, since that is what they
    compute. Modifies ``model`` in place; layers shared under several names are replaced
    by one shared ``nn.Linear``.

    Args:
        model (nn.Module): A LoRA-injected model (model wrappers are unwrapped).

    Returns:
        nn.Module: ``model`` (the unwrapped one), without any LoRALinear.

    Raises:
        ValueError: If the model has no LoRALinear layer.
    """
    model = unwrap_model(model)
    if isinstance(model, LoRALinear):
        raise TypeError('merge_lora() got a single LoRALinear; it replaces layers inside '
                        'a model. Use LoRALinear.merge(), or wrap it in a module.')
    targets = [(name, m) for name, m in model.named_modules(remove_duplicate=False)
               if isinstance(m, LoRALinear)]
    if not targets:
        raise ValueError('merge_lora: the model has no LoRALinear layer (LoRA was not '
                         'applied, or it is already merged)')
    disabled = sorted({name for name, m in targets if not m.adapter_enabled})
    if disabled:
        print_log(f'merge_lora: adapters of {disabled} are disabled; those layers keep '
                  'their base weights', logger='current', level=30)
    replacements = {}
    for name, layer in targets:
        if id(layer) not in replacements:
            replacements[id(layer)] = _plain_linear(layer)
        parent_name, _, child = name.rpartition('.')
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, replacements[id(layer)])
    # The model no longer carries LoRA: drop what apply_lora / load_adapter attached
    # (the config record and the bank of named adapters, whose keys are gone).
    for attr in (LORA_CONFIG_ATTR, ADAPTER_BANK_ATTR):
        model.__dict__.pop(attr, None)
    return model


def merge_adapters(model: nn.Module) -> List[str]:
    """Call ``merge()`` on every enabled, unmerged LoRALinear (in place, reversible).

    Args:
        model (nn.Module): A LoRA-injected model.

    Returns:
        list[str]: Names of the layers merged now.
    """
    done = []
    for name, m in unwrap_model(model).named_modules():
        if isinstance(m, LoRALinear) and not m.merged and m.adapter_enabled:
            m.merge()
            done.append(name)
    return done


def unmerge_adapters(model: nn.Module) -> List[str]:
    """Call ``unmerge()`` on every merged LoRALinear (weights restored up to rounding).

    Args:
        model (nn.Module): A LoRA-injected model.

    Returns:
        list[str]: Names of the layers unmerged now.
    """
    done = []
    for name, m in unwrap_model(model).named_modules():
        if isinstance(m, LoRALinear) and m.merged:
            m.unmerge()
            done.append(name)
    return done
