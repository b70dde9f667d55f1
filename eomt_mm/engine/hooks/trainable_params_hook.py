"""``TrainableParamsHook``: log total / trainable / LoRA parameter counts at train start."""
from __future__ import annotations

from typing import Dict

import torch.nn as nn
from mmengine.hooks import Hook
from mmseg.registry import HOOKS

from eomt_mm.lora import count_parameters
from eomt_mm.utils.model import unwrap_model

__all__ = ['TrainableParamsHook', 'format_parameter_counts']


def _trainable_by_child(model: nn.Module) -> Dict[str, int]:
    """Trainable elements per top-level child (shared parameters counted once)."""
    seen = set()
    out: Dict[str, int] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        child = name.split('.', 1)[0]
        out[child] = out.get(child, 0) + p.numel()
    return out


def format_parameter_counts(model: nn.Module, by_child: bool = True) -> str:
    """One log line: total, trainable (with %), LoRA counts, and trainable per child.

    Args:
        model (nn.Module): The model (wrappers are unwrapped).
        by_child (bool): Append the trainable count of each top-level child module.
            Defaults to True.

    Returns:
        str: e.g. ``'params: total 86,389,248 | trainable 1,179,648 (1.3655%) | lora
        1,179,648 | trainable by module: backbone=1,179,648'``.
    """
    model = unwrap_model(model)
    c = count_parameters(model)
    line = (f'params: total {c["total"]:,} | trainable {c["trainable"]:,} '
            f'({c["trainable_pct"]:.4f}%) | lora {c["lora"]:,}')
    if by_child:
        parts = [f'{k}={v:,}' for k, v in _trainable_by_child(model).items()]
        line += ' | trainable by module: ' + (', '.join(parts) if parts else 'none')
    return line


@HOOKS.register_module()
class TrainableParamsHook(Hook):
    """Log parameter counts once, before training starts.

    Args:
        by_child (bool): Also log the trainable count of each top-level child module
            (backbone, decode_head, ...). Defaults to True.
    """

    priority = 'LOW'

    def __init__(self, by_child: bool = True) -> None:
        self.by_child = bool(by_child)

    def before_train(self, runner) -> None:
        model = unwrap_model(runner.model)
        runner.logger.info(format_parameter_counts(model, by_child=self.by_child))
        if count_parameters(model)['trainable'] == 0:
            runner.logger.warning('TrainableParamsHook: the model has no trainable '
                                  'parameter; training will not change it')
