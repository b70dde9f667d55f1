"""``WithLoRA``: a registered build step that adds LoRA to any mmseg/mmpretrain model.

Config shape::

    model = dict(
        type='WithLoRA',
        model=dict(type='EncoderDecoder', backbone=..., decode_head=..., ...),
        lora_config=dict(enabled=True, rank=8, lora_alpha=16, lora_dropout=0.1,
                         target_modules=['qkv', 'proj', 'fc1', 'fc2'],
                         freeze_base_model=True))

It is a builder function, not a wrapper module: it returns the inner model object
itself, so state-dict keys, ``init_weights``, ``data_preprocessor`` and everything that
reaches into ``model.backbone`` behave exactly as without LoRA (a ``__getattr__``
wrapper would hide them). Injection and freezing happen here, at build time, which the
Runner does before wrapping the model in DDP (mmengine's ``Runner.build_model`` builds,
``Runner.wrap_model`` wraps afterwards).
"""
from __future__ import annotations

from typing import Mapping, Union

from mmengine.registry import MODELS as ROOT_MODELS
from mmengine.registry import DefaultScope
from mmseg.registry import MODELS
from torch import nn

from .apply import apply_lora
from .config import LoRAConfig

__all__ = ['WithLoRA']


def WithLoRA(model: Union[Mapping, nn.Module],
             lora_config: Union[None, Mapping, LoRAConfig] = None) -> nn.Module:
    """Build ``model`` from the registry and apply ``lora_config`` to it.

    Args:
        model (dict | nn.Module): Config of the model, built in the current default
            scope (``'mmseg'`` when none is set; ``'mmpretrain.'``-prefixed types reach
            mmpretrain), or an already built module.
        lora_config (dict | LoRAConfig | None): See :class:`LoRAConfig`; None or
            ``enabled=False`` returns the plain model.

    Returns:
        nn.Module: The inner model, adapted in place (not a wrapper).
    """
    if isinstance(model, Mapping):
        if 'type' not in model:
            raise ValueError("WithLoRA: `model` must be a config dict with a 'type' key, "
                             f'got keys {sorted(model)}')
        # Build through the root registry so the caller's default scope (mmseg in
        # mmseg configs, mmpretrain in mmpretrain configs) resolves the types, including
        # nested ones the model builds itself (data_preprocessor); fall back to mmseg.
        if DefaultScope.get_current_instance() is None:
            with DefaultScope.overwrite_default_scope('mmseg'):
                built = ROOT_MODELS.build(model)
        else:
            built = ROOT_MODELS.build(model)
    elif isinstance(model, nn.Module):
        built = model
    else:
        raise TypeError('WithLoRA: `model` must be a config dict or an nn.Module, got '
                        f'{type(model).__name__}')
    return apply_lora(built, lora_config)


MODELS.register_module(name='WithLoRA', module=WithLoRA)
