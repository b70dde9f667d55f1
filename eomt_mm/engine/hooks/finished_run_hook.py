"""``FinishedRunHook``: a resumed run with nothing left to train says so and stops.

Resuming a run whose checkpoint is already at ``max_iters`` made mmengine's
``IterBasedTrainLoop`` skip the whole data once more (it advances the dataloader by the
iterations already trained) and finish without a word. ``tools/train.py`` adds this hook;
it raises :class:`TrainingAlreadyFinished` before the loop starts, and the tool reports it
and exits with status 0: the run is complete, which is what was asked for (a job that is
restarted after it finished is not a failure). Nothing in the work dir is touched.
"""
from __future__ import annotations

from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.runner import EpochBasedTrainLoop
from mmseg.registry import HOOKS

from .custom_hooks import add_custom_hook

__all__ = ['FinishedRunHook', 'TrainingAlreadyFinished', 'add_finished_run_hook']


class TrainingAlreadyFinished(Exception):
    """The resumed run already reached its ``max_iters`` / ``max_epochs``."""


@HOOKS.register_module()
class FinishedRunHook(Hook):
    """Stop, with a message, a resumed run that is already at its end."""

    # Before every other before_train hook (MaskAnnealingHook derives its windows there).
    priority = 'HIGHEST'

    def before_train(self, runner) -> None:
        by_epoch = isinstance(runner.train_loop, EpochBasedTrainLoop)
        done, total, unit = ((runner.epoch, runner.max_epochs, 'epoch') if by_epoch else
                             (runner.iter, runner.max_iters, 'iteration'))
        if done < total:
            return
        key = 'max_epochs' if by_epoch else 'max_iters'
        raise TrainingAlreadyFinished(
            f'nothing to train: the run in {runner.work_dir} resumed at {unit} {done}, and '
            f'train_cfg.{key} is {total}; the run is complete and its checkpoints are left '
            f'as they are. To train further, raise it, e.g. --cfg-options '
            f'train_cfg.{key}={max(2 * total, done + 1)} (and the schedule\'s end), with '
            '--resume.')


def add_finished_run_hook(cfg: Config) -> bool:
    """Append ``FinishedRunHook`` to ``cfg.custom_hooks`` unless it is there.

    ``tools/train.py`` calls it for every run it starts.

    Args:
        cfg: A training config.

    Returns:
        Whether the hook was added (False: the config already lists it).
    """
    return add_custom_hook(cfg, FinishedRunHook)
