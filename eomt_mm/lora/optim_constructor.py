"""An optimizer-wrapper constructor that leaves frozen parameters out of the optimizer.

Why: mmengine's ``DefaultOptimWrapperConstructor`` passes ``model.parameters()`` (frozen
ones included) to the optimizer when ``paramwise_cfg`` is empty, and with a
``paramwise_cfg`` it skips them but logs one warning per frozen parameter (hundreds for a
frozen ViT). Frozen parameters must not be in the optimizer at all.

Usage::

    optim_wrapper = dict(
        type='OptimWrapper',
        optimizer=dict(type='AdamW', lr=1e-4, weight_decay=0.05),
        constructor='TrainableOnlyOptimWrapperConstructor',
        paramwise_cfg=dict(
            # optional: the constructor whose rules apply to the trainable parameters
            base_constructor='mmpretrain.LearningRateDecayOptimWrapperConstructor',
            layer_decay_rate=0.8,
            custom_keys={'lora_': dict(lr_mult=2.0, decay_mult=0.0)},
            norm_decay_mult=0.0))

``base_constructor`` (default ``'DefaultOptimWrapperConstructor'``) is looked up in the
optimizer-wrapper-constructor registry; all other ``paramwise_cfg`` keys go to it
unchanged, so lr/decay multipliers and layer-wise lr decay work as usual. For
mmpretrain's layer-decay constructor on an mmseg segmentor (which has no
``get_layer_depth``), the backbone's ``get_layer_depth`` is used with the ``backbone.``
prefix; the decode head then counts as the last (full-lr) layer.
"""
from __future__ import annotations

import inspect
import logging
from typing import Dict, List, Optional, Type

from mmengine.logging import MMLogger, print_log
from mmengine.optim import DefaultOptimWrapperConstructor, OptimWrapper
from mmengine.registry import OPTIM_WRAPPERS, OPTIMIZERS
from mmseg.registry import OPTIM_WRAPPER_CONSTRUCTORS
from torch import nn

__all__ = ['TrainableOnlyOptimWrapperConstructor']

_SKIP_MSG = 'is skipped since its requires_grad=False'


class _DropSkipWarnings(logging.Filter):
    """Swallows mmengine's per-parameter 'skipped' warnings; we log one summary."""

    def filter(self, record: logging.LogRecord) -> bool:
        return _SKIP_MSG not in record.getMessage()


def _drop_frozen(params: List[dict]) -> int:
    """Remove frozen parameters from param groups in place; drop emptied groups."""
    dropped = 0
    kept = []
    for group in params:
        trainable = [p for p in group['params'] if p.requires_grad]
        dropped += len(group['params']) - len(trainable)
        if trainable:
            if len(trainable) != len(group['params']) and 'param_names' in group:
                names = [n for n, p in zip(group['param_names'], group['params'])
                         if p.requires_grad]
                group['param_names'] = names
            group['params'] = trainable
            kept.append(group)
    params[:] = kept
    return dropped


_SUBCLASSES: Dict[type, type] = {}


def _trainable_only(base: Type[DefaultOptimWrapperConstructor]) -> type:
    """A subclass of ``base`` whose ``add_params`` keeps only trainable parameters."""
    if base in _SUBCLASSES:
        return _SUBCLASSES[base]

    class TrainableOnly(base):  # type: ignore[misc, valid-type]

        _depth = 0

        def add_params(self, params: List[dict], module: nn.Module, *args, **kwargs):
            # Base classes may recurse through self.add_params: filter once, at the top.
            self._depth += 1
            logger = MMLogger.get_current_instance()
            flt = _DropSkipWarnings() if self._depth == 1 else None
            if flt is not None:
                logger.addFilter(flt)
            if self._depth == 1:
                kwargs = self._with_backbone_layer_depth(module, kwargs)
            try:
                super().add_params(params, module, *args, **kwargs)
            finally:
                self._depth -= 1
                if flt is not None:
                    logger.removeFilter(flt)
            if self._depth == 0:
                _drop_frozen(params)
                # Counted on the model: the base may already have skipped some itself.
                n_frozen = sum(1 for p in module.parameters() if not p.requires_grad)
                if n_frozen:
                    print_log(f'{n_frozen} frozen parameter tensors left out of the '
                              'optimizer', logger='current')

        def _with_backbone_layer_depth(self, module: nn.Module, kwargs: dict) -> dict:
            # mmpretrain's layer-decay constructor asks the *model* for get_layer_depth;
            # mmseg segmentors do not have one, their (mmpretrain) backbone does. Lend the
            # backbone's, with the 'backbone.' prefix, so layer decay works on segmentors.
            if ('get_layer_depth' not in inspect.signature(base.add_params).parameters
                    or kwargs.get('get_layer_depth') is not None
                    or hasattr(module, 'get_layer_depth')):
                return kwargs
            backbone = getattr(module, 'backbone', None)
            if backbone is None or not hasattr(backbone, 'get_layer_depth'):
                return kwargs
            kwargs = dict(kwargs)
            kwargs['get_layer_depth'] = (
                lambda name: backbone.get_layer_depth(name, prefix='backbone.'))
            return kwargs

    TrainableOnly.__name__ = f'TrainableOnly{base.__name__}'
    _SUBCLASSES[base] = TrainableOnly
    return TrainableOnly


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class TrainableOnlyOptimWrapperConstructor:
    """Builds the optimizer from trainable parameters only (``requires_grad=True``).

    Args:
        optim_wrapper_cfg (dict): The ``optim_wrapper`` config (``optimizer`` inside).
        paramwise_cfg (dict | None): Param-wise rules for the base constructor, plus
            ``base_constructor`` (str, registered name; default
            ``'DefaultOptimWrapperConstructor'``).
    """

    def __init__(self, optim_wrapper_cfg: dict,
                 paramwise_cfg: Optional[dict] = None) -> None:
        paramwise_cfg = dict(paramwise_cfg or {})
        base_name = paramwise_cfg.pop('base_constructor', 'DefaultOptimWrapperConstructor')
        base = OPTIM_WRAPPER_CONSTRUCTORS.get(base_name)
        if base is None:
            raise ValueError(f'paramwise_cfg.base_constructor={base_name!r} is not a '
                             'registered optimizer wrapper constructor')
        if not (isinstance(base, type) and issubclass(base, DefaultOptimWrapperConstructor)):
            raise TypeError(f'base_constructor {base_name!r} must subclass '
                            'DefaultOptimWrapperConstructor (it needs add_params)')
        self.base_name = base_name
        self._impl = _trainable_only(base)(optim_wrapper_cfg, paramwise_cfg)

    def __call__(self, model: nn.Module) -> OptimWrapper:
        impl = self._impl
        if impl.paramwise_cfg:
            return impl(model)
        # Without paramwise rules the base passes model.parameters() wholesale; build
        # the same single group from the trainable parameters instead.
        if hasattr(model, 'module'):
            model = model.module
        trainable = [p for p in model.parameters() if p.requires_grad]
        if not trainable:
            raise ValueError('TrainableOnlyOptimWrapperConstructor: the model has no '
                             'trainable parameter')
        optimizer_cfg = impl.optimizer_cfg.copy()
        optimizer_cls = optimizer_cfg['type']
        if isinstance(optimizer_cls, str):
            with OPTIMIZERS.switch_scope_and_registry(None) as registry:
                optimizer_cls = registry.get(optimizer_cfg['type'])
        first_arg = next(iter(inspect.signature(optimizer_cls).parameters))
        optimizer_cfg[first_arg] = trainable
        optimizer = OPTIMIZERS.build(optimizer_cfg)
        wrapper_cfg = impl.optim_wrapper_cfg.copy()
        wrapper_cfg.setdefault('type', 'OptimWrapper')
        n_frozen = sum(1 for p in model.parameters() if not p.requires_grad)
        if n_frozen:
            print_log(f'{n_frozen} frozen parameter tensors left out of the optimizer',
                      logger='current')
        return OPTIM_WRAPPERS.build(wrapper_cfg, default_args=dict(optimizer=optimizer))
