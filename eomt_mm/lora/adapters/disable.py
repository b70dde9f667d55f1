"""``disable_adapters``: compute the base model's outputs exactly, temporarily."""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List, Tuple

import torch
import torch.nn as nn
from mmengine.logging import print_log

from ..layer import LoRALinear
from .bank import adapter_bank
from .state import MAX_LISTED, base_trainable_keys, live_tensors, lora_layers

__all__ = ['disable_adapters']


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Context manager: inside it, ``model`` computes the base model's outputs exactly.

    Every LoRALinear gets ``adapter_enabled=False``: unmerged layers then compute exactly
    ``F.linear(x, W0, b)``. Merged layers are unmerged for the duration (their base weight
    is then W0 up to fp32 rounding, since ``unmerge`` subtracts the delta)
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
    bank = adapter_bank(model, create=False)
    live = live_tensors(model)
    base = bank.base if bank is not None and bank.base is not None else None
    if base is None:
        unsnapshotted = [k for k in base_trainable_keys(model) if k in live]
        if unsnapshotted:
            print_log(
                'disable_adapters: no base snapshot of the trainable non-LoRA entries '
                f'{unsnapshotted[:MAX_LISTED]}; they keep their current values. Call '
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
