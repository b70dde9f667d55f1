"""What the soak (tests/robustness/soak.py) trains, and where it kills: settings, kill plan,
the ``tools/train.py`` command line and the demo data.
"""
from __future__ import annotations

import dataclasses
import os
import os.path as osp
import random
import subprocess
import sys
from typing import Dict, List, Sequence, Tuple

__all__ = ['MIN_ITERS', 'SoakSettings', 'PlannedKill', 'checkpoint_steps', 'plan_kills',
           'train_options', 'train_command', 'child_env', 'make_data', 'REPO']

HERE = osp.dirname(osp.abspath(__file__))
REPO = osp.dirname(osp.dirname(HERE))
TRAIN_TOOL = osp.join(REPO, 'tools', 'train.py')
DATA_TOOL = osp.join(REPO, 'tools', 'make_demo_data.py')
DEMO_CONFIG = osp.join(REPO, 'configs', 'eomt_lora_demo.py')

# The demo schedule's warm-up, (50, 100) of 600 iterations, as fractions of the run.
_WARMUP_FRACTIONS = (50 / 600, 100 / 600)
# MaskAnnealingHook derives its windows from max_iters and needs at least this many.
MIN_ITERS = 6


@dataclasses.dataclass
class SoakSettings:
    """What both runs train.

    Args:
        iters: Training iterations (``train_cfg.max_iters``).
        ckpt_interval: A checkpoint every this many iterations (and at the end).
        batch_size: Training batch size.
        max_keep_ckpts: mmengine's ``max_keep_ckpts`` (-1 keeps all; the demo keeps 2, which
            also exercises the deletion of old checkpoints under kills).
        seed: ``randomness.seed`` of both runs.
        threads: Torch threads of each training process (0 leaves torch's default).
        num_train: Training images rendered by ``tools/make_demo_data.py``.
    """

    iters: int = 600
    ckpt_interval: int = 25
    batch_size: int = 4
    max_keep_ckpts: int = 2
    seed: int = 0
    threads: int = 1
    num_train: int = 48

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first setting out of range."""
        if self.iters < MIN_ITERS:
            raise ValueError(f'iters must be >= {MIN_ITERS} (MaskAnnealingHook needs that '
                             f'many for its windows), got {self.iters}')
        if not 1 <= self.ckpt_interval <= self.iters:
            raise ValueError(f'ckpt_interval must be in [1, iters={self.iters}], got '
                             f'{self.ckpt_interval}')
        if self.batch_size < 1 or self.num_train < 1 or self.threads < 0:
            raise ValueError('batch_size and num_train must be >= 1 and threads >= 0, got '
                             f'{self.batch_size}, {self.num_train}, {self.threads}')
        if self.max_keep_ckpts == 0 or self.max_keep_ckpts < -1:
            raise ValueError(f'max_keep_ckpts must be -1 (keep all) or >= 1, got '
                             f'{self.max_keep_ckpts}')


@dataclasses.dataclass
class PlannedKill:
    """One kill of the plan.

    Args:
        kind: ``'step'`` (fires after iteration ``anchor`` is logged) or ``'save'`` (fires
            after mmengine announces the first checkpoint at or after ``anchor``).
        anchor: Iteration the trigger waits for.
        delay_s: Seconds between the trigger line and the SIGKILL.
    """

    kind: str
    anchor: int
    delay_s: float


def checkpoint_steps(iters: int, interval: int) -> List[int]:
    """Iterations at which CheckpointHook saves (every ``interval`` and the last one)."""
    steps = list(range(interval, iters + 1, interval))
    if not steps or steps[-1] != iters:
        steps.append(iters)
    return steps


def plan_kills(rng: random.Random, settings: SoakSettings, kills: int, iter_s: float,
               save_window: Tuple[float, float, float],
               save_share: float = 0.4) -> List[PlannedKill]:
    """A random kill plan whose anchors never decrease, so the run progresses between kills.

    The run is cut into ``kills`` equal segments and kill ``i`` is anchored at a random
    iteration of segment ``i``. ``round(kills * save_share)`` of the kills, at random
    positions, aim at a checkpoint save: their anchor moves up to the next checkpoint, and
    their delay after the save is announced is drawn from one of its three measured stages
    (taken in turn, from a random first one, so three save kills cover all three): gathering
    + serialising the state (nothing on disk yet), writing the file (the atomic writer's
    temporary file exists: where a plain writer would leave a truncated checkpoint), and
    renaming it + updating ``last_checkpoint``. The others fire a
    random 5-95 % of an iteration after their anchor iteration is logged, i.e. inside the
    next training step.

    Args:
        rng: Seeded generator (the plan is reproducible from the seed).
        settings: The run being killed.
        kills: Number of kills.
        iter_s: Typical duration of one training iteration (seconds).
        save_window: Typical seconds from the "Saving checkpoint" log line to the start of
            the write (temporary file created), to its end (renamed into place) and to
            ``last_checkpoint`` naming the new file.
        save_share: Fraction of the kills aimed at a checkpoint save.

    Returns:
        ``kills`` planned kills in firing order.
    """
    if kills < 0:
        raise ValueError(f'kills must be >= 0, got {kills}')
    if not 0.0 <= save_share <= 1.0:
        raise ValueError(f'save_share must be in [0, 1], got {save_share}')
    if len(save_window) != 3 or not 0.0 <= save_window[0] <= save_window[1] <= save_window[2]:
        raise ValueError('save_window must be (write start, write end, pointer updated) with '
                         f'0 <= start <= end <= updated, got {save_window}')
    stages = ((0.0, save_window[0]), (save_window[0], save_window[1]),
              (save_window[1], save_window[2]))
    saves = sorted(rng.sample(range(kills), round(kills * save_share)))
    first_stage = rng.randrange(len(stages))
    steps = checkpoint_steps(settings.iters, settings.ckpt_interval)
    # Step kills need an iteration after the anchor; the last iteration is left to save kills.
    span = settings.iters - 1
    plan: List[PlannedKill] = []
    for i in range(kills):
        lo = 1 + (i * span) // kills
        hi = max(lo, ((i + 1) * span) // kills)
        # Not before the previous kill's anchor (a save anchor may have moved up).
        anchor = max(rng.randint(lo, hi), plan[-1].anchor if plan else 1)
        if i in saves:
            save_at = next(s for s in steps if s >= anchor)
            stage = stages[(first_stage + saves.index(i)) % len(stages)]
            plan.append(PlannedKill('save', save_at, rng.uniform(*stage)))
        else:
            anchor = min(anchor, settings.iters - 1)
            plan.append(PlannedKill('step', anchor, rng.uniform(0.05, 0.95) * iter_s))
    return plan


def train_options(settings: SoakSettings, data_root: str) -> List[str]:
    """``--cfg-options`` that turn the demo config into the soak's run."""
    w1, w2 = (max(1, round(f * settings.iters)) for f in _WARMUP_FRACTIONS)
    w2 = max(w2, w1 + 1)
    return [
        f'train_cfg.max_iters={settings.iters}',
        f'param_scheduler.0.end={settings.iters}',
        f'param_scheduler.0.warmup_iters=[{w1},{w2}]',
        f'train_dataloader.batch_size={settings.batch_size}',
        f'default_hooks.checkpoint.interval={settings.ckpt_interval}',
        f'default_hooks.checkpoint.max_keep_ckpts={settings.max_keep_ckpts}',
        # One log line per iteration: the soak's clock for placing kills.
        'default_hooks.logger.interval=1',
        # Training only: validation is RNG-neutral (RNGStateHook) and not what is soaked.
        'train_cfg.val_interval=1000000000',
        'train_cfg.val_begin=1000000000',
        f'randomness.seed={settings.seed}',
    ] + [f'{loader}.dataset.data_root={data_root}'
         for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader')]


def train_command(work_dir: str, options: Sequence[str], resume: bool) -> List[str]:
    """The ``tools/train.py`` command line of one run (or restart)."""
    return ([sys.executable, TRAIN_TOOL, DEMO_CONFIG, '--work-dir', work_dir]
            + (['--resume'] if resume else []) + ['--cfg-options', *options])


def child_env(threads: int) -> Dict[str, str]:
    """Environment of the training processes: CPU only, unbuffered, fixed thread count."""
    env = dict(os.environ)
    env['PYTHONUNBUFFERED'] = '1'
    # The soak is a CPU test; on a GPU machine CUDA kernels (atomics in backward) would not be
    # bit-reproducible between the runs.
    env['CUDA_VISIBLE_DEVICES'] = ''
    if threads:
        env['OMP_NUM_THREADS'] = env['MKL_NUM_THREADS'] = str(threads)
    return env


def make_data(root: str, num_train: int) -> str:
    """Render the demo data set with the project's generator (no download)."""
    proc = subprocess.run([sys.executable, DATA_TOOL, '--out', root, '--num-train',
                           str(num_train), '--num-val', '2', '--num-anomaly', '0'],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f'tools/make_demo_data.py failed (exit {proc.returncode}):\n'
                           f'{proc.stdout}{proc.stderr}')
    return root

