"""EoMT's two-stage warm-up + poly learning-rate schedule as an mmengine param scheduler.

The reference (tue-mps/eomt ``TwoStageWarmupPolySchedule``) treats backbone and non-backbone
parameter groups differently, step ``t`` counted from 0:

* non-backbone: linear warm-up ``base * t / w1`` for ``t < w1``, then
  ``base * (1 - (t - w1) / (T - w1)) ** power``;
* backbone: ``0`` for ``t < w1``, linear warm-up ``base * (t - w1) / w2`` for
  ``w1 <= t < w1 + w2``, then ``base * (1 - (t - w1 - w2) / (T - w1 - w2)) ** power``.

mmengine's ``LinearLR`` / ``PolyLR`` act on every param group alike, and a chain of them cannot
give two groups different warm-up windows, hence this scheduler. It tells backbone groups by the
``param_name`` key that mmpretrain's ``LearningRateDecayOptimWrapperConstructor`` stores in each
group (one parameter per group), so the layer-wise lr decay (the groups' initial lr) and this
schedule combine.
"""
from typing import Sequence, Union

from mmengine.optim import BaseOptimWrapper
from mmengine.optim.scheduler.lr_scheduler import LRSchedulerMixin
from mmengine.optim.scheduler.param_scheduler import INF, _ParamScheduler
from mmseg.registry import PARAM_SCHEDULERS
from torch.optim import Optimizer


class TwoStageWarmupPolyParamScheduler(_ParamScheduler):
    """Two-stage warm-up then poly decay of ``param_name`` (see module docstring).

    Args:
        optimizer: Optimizer or optimizer wrapper whose groups carry ``param_name`` keys.
        param_name: Name of the scheduled value (``'lr'``).
        warmup_iters: ``(w1, w2)``: non-backbone warm-up length, and backbone warm-up length
            that starts after ``w1`` (reference: ``(500, 1000)``).
        power: Poly power (reference: 0.9).
        backbone_prefix: Parameter-name prefix of the backbone groups.
        begin: First step of the schedule.
        end: Step after the last one (``T = end - begin``); must be finite.
        last_step: mmengine resume argument.
        by_epoch: Must be False (the schedule is per iteration).
        verbose: Print every update.
    """

    def __init__(self,
                 optimizer: Union[Optimizer, BaseOptimWrapper],
                 param_name: str,
                 warmup_iters: Sequence[int] = (500, 1000),
                 power: float = 0.9,
                 backbone_prefix: str = 'backbone.',
                 begin: int = 0,
                 end: int = INF,
                 last_step: int = -1,
                 by_epoch: bool = False,
                 verbose: bool = False) -> None:
        if by_epoch:
            raise ValueError('TwoStageWarmupPolyLR is an iteration schedule: set by_epoch=False')
        if end >= INF:
            raise ValueError('TwoStageWarmupPolyLR needs a finite end (the total iterations)')
        if len(warmup_iters) != 2 or any(int(w) < 0 for w in warmup_iters):
            raise ValueError(f'warmup_iters must be two ints >= 0, got {warmup_iters!r}')
        self.warmup_iters = (int(warmup_iters[0]), int(warmup_iters[1]))
        if sum(self.warmup_iters) >= end - begin:
            raise ValueError(f'warm-up {self.warmup_iters} does not fit in {end - begin} '
                             'iterations')
        self.power = power
        self.total_iters = end - begin
        self.backbone_prefix = backbone_prefix
        # An mmengine OptimWrapper appends an extra, parameter-less group (its base settings,
        # for logging) to `param_groups`; only the torch optimizer's groups must be named.
        torch_groups = (optimizer.optimizer.param_groups
                        if isinstance(optimizer, BaseOptimWrapper) else optimizer.param_groups)
        if not all('param_name' in g for g in torch_groups):
            raise KeyError('TwoStageWarmupPolyLR needs param groups with a "param_name" key to '
                           'tell backbone from head parameters; build the optimizer with '
                           "constructor='mmpretrain.LearningRateDecayOptimWrapperConstructor'")
        self.is_backbone = [
            g.get('param_name', '').startswith(backbone_prefix) for g in optimizer.param_groups
        ]
        super().__init__(optimizer, param_name=param_name, begin=begin, end=end,
                         last_step=last_step, by_epoch=by_epoch, verbose=verbose)

    def value_at(self, step: int, base: float, is_backbone: bool) -> float:
        """Scheduled value at ``step`` (0-based, relative to ``begin``) for one group."""
        first, second = self.warmup_iters
        total = self.total_iters
        if not is_backbone:
            if step < first:
                return base * step / first
            return base * (1 - max(0, step - first) / max(1, total - first))**self.power
        if step < first:
            return 0.0
        if step < first + second:
            return base * (step - first) / second
        return base * (1 - max(0, step - first - second) / max(1, total - first - second)
                       )**self.power

    def _get_value(self) -> list:
        return [
            self.value_at(self.last_step, base, is_backbone)
            for base, is_backbone in zip(self.base_values, self.is_backbone)
        ]


@PARAM_SCHEDULERS.register_module()
class TwoStageWarmupPolyLR(LRSchedulerMixin, TwoStageWarmupPolyParamScheduler):
    """EoMT's learning-rate schedule: heads warm up first, the backbone after them.

    Config (with the layer-wise lr decay of the reference)::

        optim_wrapper = dict(
            type='OptimWrapper',
            optimizer=dict(type='AdamW', lr=1e-4, weight_decay=0.05),
            constructor='mmpretrain.LearningRateDecayOptimWrapperConstructor',
            paramwise_cfg=dict(layer_decay_rate=0.8),
            clip_grad=dict(max_norm=0.01, norm_type=2))
        param_scheduler = [dict(type='TwoStageWarmupPolyLR', warmup_iters=(500, 1000),
                                power=0.9, begin=0, end=max_iters, by_epoch=False)]

    Args: as :class:`TwoStageWarmupPolyParamScheduler` without ``param_name``.
    """
