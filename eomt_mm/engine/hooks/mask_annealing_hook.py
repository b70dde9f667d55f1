"""Mask annealing for EoMT: anneal the per-block masked-attention keep probabilities to 0.

For block ``j`` of the L2 query blocks the probability of keeping the attention mask is
``1`` before ``start[j]``, ``(1 - (it - start) / (end - start)) ** power`` inside the window and
``0`` from ``end[j]`` on (reference: tue-mps/eomt ``LightningModule.mask_annealing``, which sets
the value after each optimizer step from the number of steps taken; here it is set before each
iteration from ``runner.iter``, the same number).

The values live in ``model.decoder.attn_mask_probs``, a persistent buffer, so checkpoints carry
them; on resume the hook recomputes them from the restored ``runner.iter`` anyway.
"""
from fractions import Fraction
from typing import List, Optional, Sequence, Tuple

from mmengine.hooks import Hook
from mmseg.registry import HOOKS

from eomt_mm.utils.model import unwrap_model


def _round_half_up(value: Fraction) -> int:
    return int((value + Fraction(1, 2)).__floor__())


def mask_annealing_windows(total_iters: int, num_blocks: int) -> Tuple[List[int], List[int]]:
    """The reference's staggered annealing windows for a run of ``total_iters`` iterations.

    Every window lasts ``total_iters / 6``; the first starts at ``total_iters / 6``, the last
    ends at ``5 * total_iters / 6`` and the starts are evenly spaced in between, earliest block
    first (so the last sixth of training runs without masks). Values are rounded half up, which
    reproduces the reference configs exactly, e.g. Cityscapes ViT-L (19,902 iterations, 4
    blocks): starts ``[3317, 6634, 9951, 13268]``, ends ``[6634, 9951, 13268, 16585]``; COCO
    (88,692 iterations, 3 blocks): starts ``[14782, 36955, 59128]``, ends
    ``[29564, 51737, 73910]``; 5 blocks: starts ``[14782, 25869, 36955, 48042, 59128]``. With a
    single block (no reference config) its window is the whole middle 4/6.

    Args:
        total_iters: Total number of training iterations.
        num_blocks: Number L2 of query blocks.

    Returns:
        ``(start_iters, end_iters)``, one entry per block.
    """
    if not isinstance(total_iters, int) or total_iters < 6:
        raise ValueError(f'total_iters must be an int >= 6, got {total_iters!r}')
    if not isinstance(num_blocks, int) or num_blocks < 1:
        raise ValueError(f'num_blocks must be a positive int, got {num_blocks!r}')
    sixth = Fraction(total_iters, 6)
    if num_blocks == 1:
        return [_round_half_up(sixth)], [_round_half_up(5 * sixth)]
    spacing = 3 * sixth / (num_blocks - 1)
    starts = [sixth + j * spacing for j in range(num_blocks)]
    return ([_round_half_up(s) for s in starts], [_round_half_up(s + sixth) for s in starts])


def mask_keep_probability(it: int, start: int, end: int, power: float = 0.9) -> float:
    """Keep probability of one block at iteration ``it`` (see module docstring)."""
    if it < start:
        return 1.0
    if it >= end:
        return 0.0
    return (1.0 - (it - start) / (end - start))**power


@HOOKS.register_module()
class MaskAnnealingHook(Hook):
    """Set ``model.decoder.attn_mask_probs`` before every training iteration.

    Args:
        start_iters: Iteration at which each block's annealing starts (one per query block).
        end_iters: Iteration at which each block's mask is gone for good.
        power: Polynomial power of the decay.
        auto_windows: When True (and no iterations are given), derive the windows from the
            runner's ``max_iters`` with :func:`mask_annealing_windows`.
    """

    priority = 'NORMAL'

    def __init__(self,
                 start_iters: Optional[Sequence[int]] = None,
                 end_iters: Optional[Sequence[int]] = None,
                 power: float = 0.9,
                 auto_windows: bool = False) -> None:
        if (start_iters is None) != (end_iters is None):
            raise ValueError('MaskAnnealingHook: give both start_iters and end_iters, or neither '
                             '(with auto_windows=True)')
        if start_iters is None and not auto_windows:
            raise ValueError('MaskAnnealingHook: give start_iters/end_iters or set '
                             'auto_windows=True')
        if start_iters is not None:
            start_iters, end_iters = [int(s) for s in start_iters], [int(e) for e in end_iters]
            if len(start_iters) != len(end_iters):
                raise ValueError(f'MaskAnnealingHook: {len(start_iters)} start_iters but '
                                 f'{len(end_iters)} end_iters')
            bad = [(s, e) for s, e in zip(start_iters, end_iters) if not 0 <= s < e]
            if bad:
                raise ValueError('MaskAnnealingHook: every window needs 0 <= start < end, got '
                                 f'{bad}')
        if power <= 0:
            raise ValueError(f'MaskAnnealingHook: power must be > 0, got {power}')
        self.start_iters = start_iters
        self.end_iters = end_iters
        self.power = float(power)
        self.auto_windows = auto_windows

    @staticmethod
    def _decoder(runner):
        model = unwrap_model(runner.model)
        decoder = getattr(model, 'decoder', None)
        if decoder is None or not hasattr(decoder, 'attn_mask_probs'):
            raise TypeError(f'MaskAnnealingHook needs a model with decoder.attn_mask_probs '
                            f'(EoMT); got {type(model).__name__}')
        return decoder

    @staticmethod
    def _short_schedule_message(runner, max_iters: int) -> str:
        """What to do when ``auto_windows`` cannot derive windows from ``max_iters``."""
        hooks = list((getattr(runner, 'cfg', None) or {}).get('custom_hooks') or [])
        index = next((i for i, h in enumerate(hooks)
                      if isinstance(h, dict) and h.get('type') == 'MaskAnnealingHook'), None)
        where = f'custom_hooks.{index}' if index is not None else 'the MaskAnnealingHook entry'
        return (f'MaskAnnealingHook(auto_windows=True): the schedule has max_iters={max_iters}, '
                'but the annealing windows derived from it need at least 6 iterations (each '
                'window lasts max_iters / 6). For a run this short give the windows yourself '
                f'({where}: start_iters=[...], end_iters=[...], one per query block, e.g. '
                f'--cfg-options {where}.auto_windows=False {where}.start_iters=[0,1] '
                f'{where}.end_iters=[1,2] for 2 blocks), or remove the hook from '
                'custom_hooks to train without mask annealing (masked attention then stays on '
                'for the whole run).')

    def probabilities(self, it: int) -> List[float]:
        """Keep probabilities of all blocks at iteration ``it``."""
        return [mask_keep_probability(it, s, e, self.power)
                for s, e in zip(self.start_iters, self.end_iters)]

    def update(self, runner) -> None:
        """Write the probabilities for ``runner.iter`` into the model's buffer."""
        decoder = self._decoder(runner)
        if self.start_iters is None:
            max_iters = int(runner.max_iters)
            if max_iters < 6:
                raise ValueError(self._short_schedule_message(runner, max_iters))
            self.start_iters, self.end_iters = mask_annealing_windows(
                max_iters, int(decoder.attn_mask_probs.numel()))
            runner.logger.info(f'MaskAnnealingHook windows: start {self.start_iters}, '
                               f'end {self.end_iters}')
        if len(self.start_iters) != decoder.attn_mask_probs.numel():
            raise ValueError(f'MaskAnnealingHook has {len(self.start_iters)} windows but the '
                             f'model has {decoder.attn_mask_probs.numel()} query blocks')
        probs = self.probabilities(int(runner.iter))
        decoder.attn_mask_probs.copy_(
            decoder.attn_mask_probs.new_tensor(probs))

    def before_train(self, runner) -> None:
        """Recompute after build / resume, before the first iteration runs."""
        self.update(runner)

    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        """Set the probabilities used by this iteration."""
        self.update(runner)
