"""``WithLoRA``: a registered build step that adds LoRA to any mmseg/mmpretrain model.

Config shape::

    model = dict(
        type='WithLoRA',
        model=dict(type='EncoderDecoder', backbone=..., decode_head=..., ...),
        lora_config=dict(enabled=True, rank=8, lora_alpha=16, lora_dropout=0.1,
                         target_modules=['qkv', 'proj', 'fc1', 'fc2'],
                         freeze_base_model=True))

or, on top of an inherited mmseg model config (``_base_`` merges the base's ``model``
keys into this dict, next to ``type='WithLoRA'``)::

    _base_ = ['mmseg::_base_/models/upernet_vit-b16_ln_mln.py']
    model = dict(type='WithLoRA', model=dict(type='EncoderDecoder'),
                 lora_config=dict(target_modules=['fc1', 'fc2']))

Every key besides ``model`` and ``lora_config`` belongs to the inner model: the ones
``_base_`` inheritance puts there (``backbone``, ``decode_head``, ...) are merged into
``model`` (the inner dict's own values win, as in ``_base_`` merging), and
``data_preprocessor``, which mmengine's ``Runner.build_model`` adds to the model config
with ``setdefault``, is given to the inner model the same way (its own one wins).

It is a builder function, not a wrapper module: it returns the inner model object
itself, so state-dict keys, ``init_weights``, ``data_preprocessor`` and everything that
reaches into ``model.backbone`` behave exactly as without LoRA (a ``__getattr__``
wrapper would hide them). Injection and freezing happen here, at build time, which the
Runner does before wrapping the model in DDP (mmengine's ``Runner.build_model`` builds,
``Runner.wrap_model`` wraps afterwards).
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Union

from mmengine.config import ConfigDict
from mmengine.registry import MODELS as ROOT_MODELS
from mmengine.registry import DefaultScope
from mmseg.registry import MODELS
from torch import nn

from .apply import apply_lora
from .config import LoRAConfig

__all__ = ['WithLoRA']


def _inner_config(model: Mapping, data_preprocessor: Optional[Any],
                  inherited: Mapping[str, Any]) -> ConfigDict:
    """The inner model config with the keys that arrived at the ``WithLoRA`` level.

    Args:
        model (Mapping): The inner model config (has a ``'type'``).
        data_preprocessor (Any, optional): What the Runner (or an inherited config) gave.
        inherited (Mapping[str, Any]): Other inner-model keys at the ``WithLoRA`` level.

    Returns:
        ConfigDict: A new config; ``model`` is not modified.
    """
    # ConfigDict.merge is mmengine's `_base_` merge: the inner dict's own values win,
    # nested dicts merge key by key, `_delete_=True` replaces.
    inner = ConfigDict(inherited)
    inner.merge(dict(model))
    if data_preprocessor is not None:
        # Runner.build_model's rule: a model that names its own preprocessor keeps it.
        inner.setdefault('data_preprocessor', data_preprocessor)
    return inner


def WithLoRA(model: Union[Mapping, nn.Module],
             lora_config: Union[None, Mapping, LoRAConfig] = None,
             data_preprocessor: Union[None, Mapping, nn.Module] = None,
             **inherited: Any) -> nn.Module:
    """Build ``model`` from the registry and apply ``lora_config`` to it.

    Args:
        model (dict | nn.Module): Config of the model, built in the current default
            scope (``'mmseg'`` when none is set; ``'mmpretrain.'``-prefixed types reach
            mmpretrain), or an already built module.
        lora_config (dict | LoRAConfig | None): See :class:`LoRAConfig`; None or
            ``enabled=False`` returns the plain model.
        data_preprocessor (dict | nn.Module | None): The data preprocessor mmengine's
            Runner adds to every model config (the config's top-level
            ``data_preprocessor``); passed to the inner model unless its config names
            its own. An already built ``model`` keeps the one it has.
        **inherited: Other keys of the inner model that arrived at this level (what
            ``_base_`` inheritance of an mmseg model config puts there); merged into
            ``model``, whose own values win.

    Returns:
        nn.Module: The inner model, adapted in place (not a wrapper).
    """
    if isinstance(model, Mapping):
        if 'type' not in model:
            raise ValueError("WithLoRA: `model` must be a config dict with a 'type' key, "
                             f'got keys {sorted(model)}')
        model = _inner_config(model, data_preprocessor, inherited)
        # Build through the root registry so the caller's default scope (mmseg in
        # mmseg configs, mmpretrain in mmpretrain configs) resolves the types, including
        # nested ones the model builds itself (data_preprocessor); fall back to mmseg.
        if DefaultScope.get_current_instance() is None:
            with DefaultScope.overwrite_default_scope('mmseg'):
                built = ROOT_MODELS.build(model)
        else:
            built = ROOT_MODELS.build(model)
    elif isinstance(model, nn.Module):
        if inherited:
            raise TypeError(
                f'WithLoRA: `model` is an already built {type(model).__name__}, so the '
                f'model config keys {sorted(inherited)} next to it cannot be applied; '
                'pass `model` as a config dict, or drop those keys')
        built = model
    else:
        raise TypeError('WithLoRA: `model` must be a config dict or an nn.Module, got '
                        f'{type(model).__name__}')
    return apply_lora(built, lora_config)


MODELS.register_module(name='WithLoRA', module=WithLoRA)
