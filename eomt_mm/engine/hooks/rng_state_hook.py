"""Save torch's random-number state in checkpoints so ``--resume`` is exact.

Why this hook exists: mmengine 0.10.7 re-seeds on resume
(``Runner.set_randomness``) and skips the batches already trained by running
the dataloader again, which replays the data pipeline's numpy/python random
draws, but it does not store torch's generator state. Everything that draws
from torch's default generator during a training step (LoRA dropout, dropout
and drop-path in the model, the point sampling of the mask loss) therefore
gets different numbers after a resume than in an uninterrupted run with the
same seed. This hook writes the CPU (and, when CUDA is initialised, every
GPU's) generator state of every rank into the checkpoint and puts it back
right before the first resumed iteration, i.e. after mmengine has skipped
the trained batches (which draws nothing from torch's default generator: the
samplers have their own seeded generators).

numpy and python ``random`` states are deliberately not restored: the
pipeline's draws for the skipped batches are replayed by mmengine's skip, and
restoring them as well would apply those draws twice.

Two details make the stored state the one the next iteration really starts
with:

* ``Runner.save_checkpoint`` runs on rank 0 only, so the states of all ranks
  are gathered in ``after_train_iter`` (a small collective each iteration when
  several processes train; its priority puts it before ``CheckpointHook``)
  and rank 0 writes the latest gathered list.
* Validation inside training would otherwise move torch's generator (every
  ``iter(DataLoader)`` draws its base seed from it) after a checkpoint was
  written but before the next iteration, which a resumed run never repeats.
  The hook therefore restores the generator after each validation, so
  validation does not change the training stream at all.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
from mmengine.config import Config
from mmengine.dist import all_gather_object, get_rank, get_world_size
from mmengine.hooks import Hook
from mmseg.registry import HOOKS

from .custom_hooks import add_custom_hook

__all__ = ['RNGStateHook', 'add_rng_state_hook']

_KEY = 'torch_rng_state'


def _capture() -> Dict[str, Any]:
    state: Dict[str, Any] = dict(cpu=torch.get_rng_state())
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return state


def _restore(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state['cpu'])
    if 'cuda' in state and torch.cuda.is_available():
        states = state['cuda']
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)


@HOOKS.register_module()
class RNGStateHook(Hook):
    """Store/restore torch's generator states (one per rank) in checkpoints.

    The checkpoint gets ``torch_rng_state``: a list with one entry per rank,
    each ``dict(cpu=ByteTensor[, cuda=[ByteTensor, ...]])``. On resume with
    the same number of processes each rank gets its own state back; with a
    different number the states cannot be mapped and are not restored (a
    warning says so; training continues as mmengine alone would).
    """

    # Before CheckpointHook (VERY_LOW) so the gathered states are current
    # when it saves.
    priority = 'LOW'

    def __init__(self) -> None:
        self._pending: Optional[Dict[str, Any]] = None
        self._latest: Optional[List[Dict[str, Any]]] = None
        self._before_val: Optional[Dict[str, Any]] = None

    def after_train_iter(self, runner, batch_idx: int, data_batch: Any = None,
                         outputs: Any = None) -> None:
        """Collect every rank's state after each step (all ranks call it).

        Args:
            runner: The runner.
            batch_idx: Index of the iteration.
            data_batch: The batch (unused).
            outputs: The step's outputs (unused).
        """
        state = _capture()
        self._latest = (all_gather_object(state)
                        if get_world_size() > 1 else [state])

    def before_val(self, runner) -> None:
        """Remember the generator state before a validation run.

        Args:
            runner: The runner.
        """
        self._before_val = _capture()

    def after_val(self, runner) -> None:
        """Put the pre-validation state back (validation is RNG-neutral).

        Args:
            runner: The runner.
        """
        if self._before_val is not None:
            _restore(self._before_val)
            self._before_val = None

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        """Write the latest states of all ranks (rank 0 only runs this).

        Args:
            runner: The runner.
            checkpoint: The checkpoint dict being written.
        """
        if self._latest is not None:
            checkpoint[_KEY] = self._latest
        elif get_world_size() == 1:
            checkpoint[_KEY] = [self._before_val or _capture()]

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        """Remember this rank's saved state when resuming.

        Args:
            runner: The runner.
            checkpoint: The loaded checkpoint dict.
        """
        if not runner._resume or _KEY not in checkpoint:
            # load_from without resume starts a new run: keep the RNG that randomness.seed set.
            return
        states = checkpoint[_KEY]
        if len(states) != get_world_size():
            runner.logger.warning(
                f'The checkpoint holds torch RNG states of {len(states)} '
                f'process(es) but {get_world_size()} are running; they are '
                'not restored, so random draws (dropout, point sampling) '
                'differ from an uninterrupted run.')
            return
        self._pending = states[get_rank()]

    def before_train_iter(self, runner, batch_idx: int,
                          data_batch: Any = None) -> None:
        """Restore the saved state once, before the first resumed step.

        Args:
            runner: The runner.
            batch_idx: Index of the iteration.
            data_batch: The batch (unused).
        """
        if self._pending is not None:
            _restore(self._pending)
            self._pending = None


def add_rng_state_hook(cfg: Config) -> bool:
    """Append ``RNGStateHook`` to ``cfg.custom_hooks`` unless it is there.

    Args:
        cfg: A training config.

    Returns:
        Whether the hook was added.
    """
    return add_custom_hook(cfg, RNGStateHook)
