#!/usr/bin/env python
"""Soak test: train the demo, SIGKILL it at random points, resume, and compare with a clean run.

What it does (all on the CPU, through the same command a user types):

1. renders a demo data set with ``tools/make_demo_data.py`` into the work dir;
2. **reference**: ``tools/train.py configs/eomt_lora_demo.py`` for ``--iters`` iterations with a
   checkpoint every ``--ckpt-interval`` iterations, uninterrupted, seed ``--seed``;
3. **soak**: the same command in a second work dir, killed with SIGKILL (the whole process
   group) ``--kills`` times and restarted with ``--resume`` after each kill until it finishes.
   The kill points come from a seeded plan: the run is cut into ``--kills`` segments and each
   kill is anchored at a random iteration of its segment; a *step* kill fires a random fraction
   of an iteration after that iteration is logged (so it lands inside the next training step),
   a *save* kill (``--save-share`` of them) fires a random delay after mmengine announces
   the next checkpoint, aimed at one of the stages of a save as timed on the reference run
   by watching its work dir: serialising, writing the file, or renaming it and updating
   ``last_checkpoint``;
4. after every kill the soak work dir is scanned: every ``*.pth`` must load with the project's
   weights-only loader and be a complete checkpoint of the iteration its name says,
   ``last_checkpoint`` must name such a file, and the only other leftovers allowed are the
   temporary files of ``eomt_mm.engine.checkpoint``'s atomic writer (``.<name>.<pid>.<uuid>.tmp``
   beside the target), which resume never reads (it only follows ``last_checkpoint``);
5. the final checkpoints of both runs are compared: the largest absolute difference over every
   tensor of the ``state_dict`` (parameters and buffers) and of the optimizer state.

The tolerance is 0 (``--atol``): ``tools/train.py`` adds ``RNGStateHook`` and mmengine replays
the data sampler on resume, so a resumed run is meant to be bit-identical to an uninterrupted
one with the same seed on the same machine (``tests/test_demo_tools.py`` asserts ``torch.equal``
for one resume). Any non-zero difference is a real divergence, not rounding: both runs execute
the same kernels on the same inputs in the same order. The script exits with 1 when the weights
differ beyond ``--atol``, a half-written or unloadable checkpoint or an empty or dangling
``last_checkpoint`` was found, a restart failed or the run did not finish within ``--minutes``.

    python tools/benchmark/soak.py --iters 60 --ckpt-interval 5 --kills 3 --batch-size 2  # ~2 min
    python tools/benchmark/soak.py --out soak.json        # 600 iterations, 8 kills (~8-11 min)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import os.path as osp
import queue
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

HERE = osp.dirname(osp.abspath(__file__))
REPO = osp.dirname(osp.dirname(HERE))
for _path in (HERE, REPO):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from bench_stats import cpu_name, format_table  # noqa: E402

TRAIN_TOOL = osp.join(REPO, 'tools', 'train.py')
DATA_TOOL = osp.join(REPO, 'tools', 'make_demo_data.py')
DEMO_CONFIG = osp.join(REPO, 'configs', 'eomt_lora_demo.py')

# mmengine's log lines (LoggerHook with interval 1, CheckpointHook, Runner.resume) are the only
# window into the child; they are flushed line by line with PYTHONUNBUFFERED.
_ITER_RE = re.compile(r'Iter\(train\) \[\s*(\d+)/(\d+)\]')
_SAVE_RE = re.compile(r'Saving checkpoint at (\d+) iterations')
_RESUMED_RE = re.compile(r'resumed epoch: \d+, iter: (\d+)')
# The temporary name eomt_mm.engine.checkpoint._atomic_write gives a checkpoint while it is
# written: '.<final name>.<pid>.<uuid4 hex>.tmp' in the target's folder.
_TEMP_RE = re.compile(r'^\.(?P<target>.+)\.(?P<pid>\d+)\.(?P<uid>[0-9a-f]{32})\.tmp$')
_CKPT_NAME_RE = re.compile(r'^iter_(\d+)\.pth$')

# Phases a kill can land in, from what the child printed last and what is on disk afterwards.
PHASE_STARTUP = 'start-up / resume'
PHASE_STEP = 'training step'
PHASE_SAVE_BEFORE_WRITE = 'save: serialising (nothing written)'
PHASE_SAVE_MID_WRITE = 'save: writing (temp file left)'
PHASE_SAVE_BEFORE_POINTER = 'save: renamed, last_checkpoint not updated'
PHASE_SAVE_POINTER_EMPTY = 'save: writing last_checkpoint (left empty)'
PHASE_AFTER_SAVE = 'right after a save'
SAVE_PHASES = (PHASE_SAVE_BEFORE_WRITE, PHASE_SAVE_MID_WRITE, PHASE_SAVE_BEFORE_POINTER,
               PHASE_SAVE_POINTER_EMPTY)

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
    (taken in turn, from a random first one, so three save kills cover all three): gathering + serialising the state (nothing on disk yet), writing the
    file (the atomic writer's temporary file exists: where a plain writer would leave a
    truncated checkpoint), and renaming it + updating ``last_checkpoint``. The others fire a
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


# --------------------------------------------------------------------------- work-dir checks


@dataclasses.dataclass
class ScanReport:
    """What :func:`scan_work_dir` found.

    Args:
        checkpoints: Complete checkpoint name -> its ``meta['iter']``.
        broken: Name -> reason, for every ``*.pth`` that is not a complete checkpoint.
        temp_files: Leftover temporary files of the atomic writer.
        last_checkpoint: The file ``last_checkpoint`` names (None when absent).
        problems: Everything that makes the folder unsafe to resume from.
    """

    checkpoints: Dict[str, int]
    broken: Dict[str, str]
    temp_files: List[str]
    last_checkpoint: Optional[str]
    problems: List[str]

    @property
    def ok(self) -> bool:
        """Whether nothing was half-written and resume would find a complete checkpoint."""
        return not self.problems


def _check_checkpoint(path: str) -> Tuple[Optional[int], Optional[str]]:
    """``(meta iter, None)`` for a complete checkpoint, ``(None, reason)`` otherwise."""
    from eomt_mm.engine.checkpoint import load_checkpoint_weights_only
    try:
        ckpt = load_checkpoint_weights_only(path, map_location='cpu')
    except Exception as err:  # noqa: BLE001  any failure to load is the finding itself
        return None, f'{type(err).__name__}: {str(err)[:300]}'
    if not isinstance(ckpt, dict) or not {'state_dict', 'meta', 'optimizer'} <= set(ckpt):
        keys = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        return None, f'not a complete training checkpoint (keys {keys})'
    it = ckpt['meta'].get('iter')
    name = _CKPT_NAME_RE.match(osp.basename(path))
    if name and it != int(name.group(1)):
        return None, f'meta iter {it} does not match the file name'
    return int(it), None


def scan_work_dir(work_dir: str) -> ScanReport:
    """Check that a training work dir holds no half-written checkpoint.

    Args:
        work_dir: The ``--work-dir`` of a training run (checkpoints are written at its top).

    Returns:
        The report; ``report.ok`` is False when any ``*.pth`` fails to load with the
        weights-only loader or is incomplete, when ``last_checkpoint`` is empty, names a
        missing or broken file or a temporary file, or when a temporary file carries a name
        that resume or a ``*.pth`` glob could pick up.
    """
    names = sorted(os.listdir(work_dir))
    checkpoints: Dict[str, int] = {}
    broken: Dict[str, str] = {}
    temps: List[str] = []
    problems: List[str] = []
    for name in names:
        path = osp.join(work_dir, name)
        if not osp.isfile(path):
            continue
        if _TEMP_RE.match(name):
            temps.append(name)
            if name.endswith('.pth'):
                problems.append(f'temporary file {name} ends in .pth')
        elif name.endswith('.pth'):
            it, reason = _check_checkpoint(path)
            if reason is None:
                checkpoints[name] = it
            else:
                broken[name] = reason
                problems.append(f'half-written or unreadable checkpoint {name}: {reason}')
    target = None
    pointer = osp.join(work_dir, 'last_checkpoint')
    if osp.exists(pointer):
        with open(pointer) as f:
            target = f.read().strip()
        base = osp.basename(target)
        if not target:
            problems.append('last_checkpoint is empty (a resume would fail)')
        elif _TEMP_RE.match(base):
            problems.append(f'last_checkpoint names a temporary file: {target}')
        elif not osp.isfile(target):
            problems.append(f'last_checkpoint names a missing file: {target}')
        elif osp.dirname(osp.abspath(target)) == osp.abspath(work_dir):
            if base not in checkpoints:
                problems.append(f'last_checkpoint names a broken file: {target}')
        else:
            _, reason = _check_checkpoint(target)
            if reason:
                problems.append(f'last_checkpoint names a broken file: {target}: {reason}')
    return ScanReport(checkpoints, broken, temps, target, problems)


# --------------------------------------------------------------------------- final comparison


def _max_abs_diff(a: Any, b: Any, where: str, differing: List[str]) -> float:
    """Largest |a - b| over all tensors/numbers of two nested structures (inf on mismatch)."""
    import torch
    if torch.is_tensor(a) and torch.is_tensor(b):
        if a.shape != b.shape or a.dtype != b.dtype:
            differing.append(f'{where}: {tuple(a.shape)} {a.dtype} vs {tuple(b.shape)} {b.dtype}')
            return math.inf
        if a.numel() == 0:
            return 0.0
        d = float((a.double() - b.double()).abs().max())
        if d != 0.0 or math.isnan(d):
            differing.append(where)
        return math.inf if math.isnan(d) else d
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            differing.append(f'{where}: keys differ ({sorted(set(a) ^ set(b), key=str)[:5]})')
            return math.inf
        return max([_max_abs_diff(a[k], b[k], f'{where}.{k}', differing) for k in a],
                   default=0.0)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            differing.append(f'{where}: lengths {len(a)} vs {len(b)}')
            return math.inf
        return max([_max_abs_diff(x, y, f'{where}[{i}]', differing)
                    for i, (x, y) in enumerate(zip(a, b))], default=0.0)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        d = abs(float(a) - float(b))
        if d:
            differing.append(where)
        return d
    if a != b:
        differing.append(f'{where}: {a!r} vs {b!r}')
        return math.inf
    return 0.0


def compare_checkpoints(reference: str, candidate: str) -> Dict[str, Any]:
    """Compare two final training checkpoints tensor by tensor.

    Args:
        reference: Checkpoint of the uninterrupted run.
        candidate: Checkpoint of the killed-and-resumed run.

    Returns:
        ``max_weight_diff`` (every state_dict tensor: parameters and buffers),
        ``max_optimizer_diff`` (every optimizer-state tensor and hyper-parameter),
        ``tensors`` (state_dict entries compared), ``iters`` (meta iter of both) and
        ``differing`` (first names that differ).
    """
    from eomt_mm.engine.checkpoint import load_checkpoint_weights_only
    ref = load_checkpoint_weights_only(reference, map_location='cpu')
    got = load_checkpoint_weights_only(candidate, map_location='cpu')
    differing: List[str] = []
    weights = _max_abs_diff(ref['state_dict'], got['state_dict'], 'state_dict', differing)
    optim = _max_abs_diff(ref['optimizer'], got['optimizer'], 'optimizer', differing)
    return dict(max_weight_diff=weights, max_optimizer_diff=optim,
                tensors=len(ref['state_dict']),
                iters=[ref['meta'].get('iter'), got['meta'].get('iter')],
                differing=differing[:20])


# --------------------------------------------------------------------------- running and killing


class TrainProcess:
    """One ``tools/train.py`` process in its own process group, its log read line by line.

    Args:
        cmd: Command line.
        env: Environment.
        log_path: File that receives the child's stdout and stderr.
        work_dir: The run's work dir (stat'ed when a save is announced).
        watch_saves: Time every save on disk (see :attr:`save_windows`).
    """

    def __init__(self, cmd: Sequence[str], env: Dict[str, str], log_path: str,
                 work_dir: str, watch_saves: bool = False) -> None:
        self.work_dir = work_dir
        self.watch_saves = watch_saves
        self.started = time.monotonic()
        self.events: 'queue.Queue[tuple]' = queue.Queue()
        self.tail: List[str] = []
        #: Per watched save, seconds from its log line to the atomic writer's temporary
        #: file appearing, to the checkpoint being renamed into place and to
        #: ``last_checkpoint`` naming it.
        self.save_windows: List[Tuple[float, float, float]] = []
        self._watchers: List[threading.Thread] = []
        self._log = open(log_path, 'w')
        # A new session makes the child the leader of its own process group, so one killpg
        # reaches it and anything it spawned, and nothing of ours.
        self.proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, bufsize=1, env=env,
                                     cwd=REPO, start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        """The child's process id (also its process group id)."""
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            now = time.monotonic()
            self._log.write(line)
            self.tail = (self.tail + [line])[-40:]
            m = _ITER_RE.search(line)
            if m:
                self.events.put(('iter', now, int(m.group(1))))
                continue
            m = _SAVE_RE.search(line)
            if m:
                step = int(m.group(1))
                # Identity of the file this save will replace (if any), to tell afterwards
                # whether the save reached the rename.
                try:
                    st = os.stat(osp.join(self.work_dir, f'iter_{step}.pth'))
                    before = (st.st_ino, st.st_mtime_ns)
                except FileNotFoundError:
                    before = None
                self.events.put(('save', now, step, before))
                if self.watch_saves:
                    watcher = threading.Thread(target=self._watch_save,
                                               args=(step, now, before), daemon=True)
                    watcher.start()
                    self._watchers.append(watcher)
                continue
            m = _RESUMED_RE.search(line)
            if m:
                self.events.put(('resumed', now, int(m.group(1))))
        self._log.flush()
        self.events.put(('eof', time.monotonic()))

    def _watch_save(self, step: int, announced: float, before: Optional[tuple]) -> None:
        """Poll the work dir every millisecond until the announced save has finished.

        The log says when a save starts but not when its bytes hit the disk or when
        ``last_checkpoint`` names the new file; kills meant for those stages need their
        timing, measured here on the reference run. Appends ``(temporary file created,
        renamed into place, last_checkpoint updated)`` in seconds after the announcement.
        """
        name = f'iter_{step}.pth'
        target = osp.join(self.work_dir, name)
        pointer = osp.join(self.work_dir, 'last_checkpoint')
        prefix = f'.{name}.{self.proc.pid}.'
        start = end = None
        while time.monotonic() < announced + 30 and self.proc.poll() is None:
            try:
                if end is None:
                    names = os.listdir(self.work_dir)
                    now = time.monotonic() - announced
                    if start is None and any(n.startswith(prefix) for n in names):
                        start = now
                    if name in names:
                        st = os.stat(target)
                        if (st.st_ino, st.st_mtime_ns) != before:
                            end = now
                if end is not None:
                    with open(pointer) as f:
                        named = f.read().strip()
                    if osp.basename(named) == name:
                        now = time.monotonic() - announced
                        self.save_windows.append((end if start is None else start, end, now))
                        return
            except FileNotFoundError:  # a file went between listdir and stat: poll again
                pass
            time.sleep(0.001)

    def kill(self) -> bool:
        """SIGKILL the process group; False when the child had already exited."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            return False
        return True

    def finish(self) -> int:
        """Wait for the child and its log reader; returns the exit status."""
        code = self.proc.wait()
        self._reader.join()
        for watcher in self._watchers:
            watcher.join()
        self._log.close()
        return code


@dataclasses.dataclass
class Attempt:
    """One process of a run.

    Args:
        index: 0 for the first start, then one per restart.
        resumed_from: Iteration the process resumed at (0 for a fresh start).
        last_iter: Last iteration it logged.
        exit_code: Its exit status (-9 when killed).
        saves: Checkpoint saves it announced.
        iter_times: Seconds between consecutive iteration log lines (saves excluded).
        save_windows: Per watched save, seconds from its announcement to the start and the
            end of its write and to the update of ``last_checkpoint``.
        first_iter_s: Seconds from start to its first iteration log line.
    """

    index: int
    resumed_from: int = 0
    last_iter: int = 0
    exit_code: Optional[int] = None
    saves: List[int] = dataclasses.field(default_factory=list)
    iter_times: List[float] = dataclasses.field(default_factory=list)
    save_windows: List[Tuple[float, float, float]] = dataclasses.field(default_factory=list)
    first_iter_s: Optional[float] = None


def _classify(last_event: Optional[tuple], scan: ScanReport, pid: int, work_dir: str) -> str:
    """Where a kill landed, from the child's last log line and the files it left."""
    for temp in scan.temp_files:
        m = _TEMP_RE.match(temp)
        if int(m.group('pid')) == pid and _CKPT_NAME_RE.match(m.group('target')):
            return PHASE_SAVE_MID_WRITE
    if last_event is None or last_event[0] == 'resumed':
        return PHASE_STARTUP
    if last_event[0] != 'save':
        return PHASE_STEP
    _, _, step, before = last_event
    name = f'iter_{step}.pth'
    try:
        st = os.stat(osp.join(work_dir, name))
        after = (st.st_ino, st.st_mtime_ns)
    except FileNotFoundError:
        after = None
    if after is None or after == before:
        return PHASE_SAVE_BEFORE_WRITE
    if scan.last_checkpoint == '':
        return PHASE_SAVE_POINTER_EMPTY
    if osp.basename(scan.last_checkpoint or '') != name:
        return PHASE_SAVE_BEFORE_POINTER
    return PHASE_AFTER_SAVE


def run_training(work_dir: str, options: Sequence[str], settings: SoakSettings,
                 plan: Sequence[PlannedKill], deadline: float, log_dir: str,
                 say=print, watch_saves: bool = False) -> Dict[str, Any]:
    """Train to the end, killing and resuming as planned; scan the work dir after each kill.

    Args:
        work_dir: The run's work dir (must not hold a previous run).
        options: ``--cfg-options`` of every start.
        settings: The run's settings (for the budget estimate).
        plan: Kills in firing order (empty for the reference run).
        deadline: ``time.monotonic()`` by which the run must have finished; kills that would
            push the finish past it are skipped, and a child still running then is stopped.
        log_dir: Where each process's output goes (``attempt_<i>.log``).
        say: Progress printer.
        watch_saves: Time each save's write on disk (``attempts[i]['save_windows']``).

    Returns:
        ``attempts``, ``kills`` (one record per delivered kill), ``skipped_kills``,
        ``problems`` (found by the scans after each kill and at the end), ``finished``,
        ``failure``, ``final_checkpoint`` and ``temp_files`` (left at the end).
    """
    env = child_env(settings.threads)
    attempts: List[Attempt] = []
    kills: List[Dict[str, Any]] = []
    problems: List[str] = []
    pending = list(plan)
    skipped = 0
    failure = None
    finished = False
    while True:
        attempt = Attempt(index=len(attempts))
        attempts.append(attempt)
        child = TrainProcess(train_command(work_dir, options, resume=attempt.index > 0), env,
                             osp.join(log_dir, f'attempt_{attempt.index}.log'), work_dir,
                             watch_saves)
        fire_at = None
        last_event = None
        prev_iter_t = None
        killed = False
        while True:
            timeout = 0.2 if fire_at is None else max(0.0, fire_at - time.monotonic())
            try:
                ev = child.events.get(timeout=min(timeout, 0.2))
            except queue.Empty:
                ev = None
            if ev is not None and ev[0] == 'eof':
                break
            if ev is not None:
                last_event = ev
                if ev[0] == 'iter':
                    attempt.last_iter = ev[2]
                    if prev_iter_t is not None:
                        attempt.iter_times.append(ev[1] - prev_iter_t)
                    if attempt.first_iter_s is None:
                        attempt.first_iter_s = ev[1] - child.started
                    prev_iter_t = ev[1]
                elif ev[0] == 'save':
                    attempt.saves.append(ev[2])
                    prev_iter_t = None  # the save is not part of the next iteration's time
                elif ev[0] == 'resumed':
                    attempt.resumed_from = ev[2]
                if fire_at is None and pending:
                    nxt = pending[0]
                    if ((nxt.kind == 'step' and ev[0] == 'iter' and ev[2] >= nxt.anchor)
                            or (nxt.kind == 'save' and ev[0] == 'save' and ev[2] >= nxt.anchor)):
                        fire_at = ev[1] + nxt.delay_s
            now = time.monotonic()
            if fire_at is not None and now >= fire_at:
                nxt = pending.pop(0)
                # Budget: a restart costs a start-up plus the iterations since the last
                # checkpoint; if that could overrun the deadline, stop killing.
                times = [t for a in attempts for t in a.iter_times]
                est_iter = statistics.median(times) if times else 1.0
                est_start = max([a.first_iter_s for a in attempts if a.first_iter_s] or [30.0])
                left = settings.iters - attempt.last_iter + settings.ckpt_interval
                if now + 1.5 * (est_start + left * est_iter) > deadline:
                    skipped += 1 + len(pending)
                    pending.clear()
                    say(f'  budget: {skipped} kill(s) skipped so the run ends in time')
                elif child.kill():
                    killed = True
                    kills.append(dict(kind=nxt.kind, anchor=nxt.anchor, delay_s=nxt.delay_s,
                                      attempt=attempt.index))
                    break
                fire_at = None
            if now > deadline:
                child.kill()
                failure = 'the run did not finish within the time budget (--minutes)'
                break
        attempt.exit_code = child.finish()
        attempt.save_windows = list(child.save_windows)
        # Events the child printed before it died but the loop had not read yet.
        while True:
            try:
                ev = child.events.get_nowait()
            except queue.Empty:
                break
            if ev[0] == 'iter':
                attempt.last_iter = ev[2]
            elif ev[0] == 'save':
                attempt.saves.append(ev[2])
            elif ev[0] == 'resumed':
                attempt.resumed_from = ev[2]
            if ev[0] != 'eof':
                last_event = ev
        if failure:
            break
        if killed and attempt.exit_code == -signal.SIGKILL:
            scan = scan_work_dir(work_dir)
            record = kills[-1]
            record.update(
                last_logged_iter=attempt.last_iter,
                phase=_classify(last_event, scan, child.pid, work_dir),
                temp_files=len(scan.temp_files), resume_point=scan.last_checkpoint,
                problems=scan.problems)
            say(f"  kill {len(kills)} ({record['kind']} @ {record['anchor']}): after logged "
                f"iteration {attempt.last_iter}, {record['phase']}; resume from "
                f"{_resume_point(scan.last_checkpoint)}"
                + (f"; PROBLEMS: {scan.problems}" if scan.problems else ''))
            if scan.problems:
                problems.extend(f"after kill {len(kills)}: {p}" for p in scan.problems)
            continue
        if killed:
            # The kill raced the child's normal exit; it did not interrupt anything.
            kills.pop()
        if attempt.exit_code == 0:
            finished = True
        else:
            failure = (f'attempt {attempt.index} exited with status {attempt.exit_code}; '
                       f'log tail:\n{"".join(child.tail[-15:])}')
        break
    scan = scan_work_dir(work_dir)
    problems.extend(f'at the end: {p}' for p in scan.problems)
    return dict(attempts=[dataclasses.asdict(a) for a in attempts], kills=kills,
                skipped_kills=skipped, problems=problems, finished=finished, failure=failure,
                final_checkpoint=scan.last_checkpoint if finished else None,
                temp_files=scan.temp_files)


def summarize(settings: SoakSettings, soak: Dict[str, Any],
              comparison: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """Counts of the soak run: iterations trained, checkpoints written, kills by phase.

    ``unsafe_files`` counts distinct findings of :func:`scan_work_dir` (a half-written or
    unreadable ``*.pth``, an empty or dangling ``last_checkpoint``), over all scans.
    """
    attempts = soak['attempts']
    trained = sum(max(0, a['last_iter'] - a['resumed_from']) for a in attempts)
    phases = [k.get('phase') for k in soak['kills']]
    unfinished_saves = sum(p in (PHASE_SAVE_BEFORE_WRITE, PHASE_SAVE_MID_WRITE) for p in phases)
    saves = sum(len(a['saves']) for a in attempts) - unfinished_saves
    return dict(
        # A run killed right after its final save resumes at max_iters and logs nothing.
        final_iter=(max(attempts[-1]['last_iter'], attempts[-1]['resumed_from'])
                    if soak['finished'] else None),
        iterations_trained=trained,
        iterations_redone=trained - settings.iters if soak['finished'] else None,
        checkpoints_written=saves, restarts=len(attempts) - 1,
        kills_survived=len(soak['kills']) if soak['finished'] else 0,
        kills_in_save=sum(p in SAVE_PHASES for p in phases),
        phases={p: phases.count(p) for p in sorted(set(phases))},
        temp_files_left=len(soak['temp_files']),
        # A file stays broken from the kill that broke it to the end: count it once.
        unsafe_files=len({p.split(': ', 1)[1] for p in soak['problems']}),
        max_weight_diff=None if comparison is None else comparison['max_weight_diff'],
        max_optimizer_diff=None if comparison is None else comparison['max_optimizer_diff'])


def _resume_point(pointer: Optional[str]) -> str:
    """What ``--resume`` starts from, given the content of ``last_checkpoint``."""
    if pointer is None:
        return 'scratch'  # no last_checkpoint yet: mmengine starts a new run
    return osp.basename(pointer) or '(empty last_checkpoint)'


def report(summary: Dict[str, Any], soak: Dict[str, Any], settings: SoakSettings,
           header: str, wall_s: float) -> str:
    """The soak's tables: one summary row, then one row per kill."""

    def diff(value: Optional[float]) -> str:
        return 'n/a' if value is None else f'{value:.3g}'

    table = format_table(
        ['iterations', 'trained (redone)', 'checkpoints written', 'kills survived',
         'in a save', 'temp files left', 'unsafe files found', 'max abs diff weights',
         'max abs diff optimizer', 'wall time'],
        [[f"{summary['final_iter']}/{settings.iters}" if summary['final_iter'] else
          f'unfinished/{settings.iters}',
          f"{summary['iterations_trained']} ({summary['iterations_redone']})"
          if soak['finished'] else f"{summary['iterations_trained']} (n/a)",
          summary['checkpoints_written'], summary['kills_survived'], summary['kills_in_save'],
          summary['temp_files_left'], summary['unsafe_files'],
          diff(summary['max_weight_diff']), diff(summary['max_optimizer_diff']),
          f'{wall_s / 60:.1f} min']])
    rows = [[i + 1, k['kind'], k['anchor'], f"{k['delay_s'] * 1000:.0f} ms",
             k.get('last_logged_iter', '?'), k.get('phase', '?'),
             _resume_point(k.get('resume_point'))] for i, k in enumerate(soak['kills'])]
    kills = format_table(['kill', 'aimed at', 'anchor iter', 'delay', 'last logged iter',
                          'landed in', 'resumed from'], rows) if rows else '(no kills)'
    return f'{header}\n{table}\n\n{kills}'


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--iters', type=int, default=600, help='training iterations (600)')
    parser.add_argument('--ckpt-interval', type=int, default=25,
                        help='checkpoint every N iterations (25)')
    parser.add_argument('--kills', type=int, default=8, help='kills to deliver (8)')
    parser.add_argument('--save-share', type=float, default=0.4,
                        help='fraction of the kills aimed at a checkpoint save (0.4)')
    parser.add_argument('--seed', type=int, default=0,
                        help='training seed and seed of the kill plan (0)')
    parser.add_argument('--batch-size', type=int, default=4, help='training batch (4, the demo)')
    parser.add_argument('--max-keep-ckpts', type=int, default=2,
                        help='checkpoints kept (2, the demo; -1 keeps all)')
    parser.add_argument('--threads', type=int, default=1,
                        help='torch threads per training process (1; 0 = torch default)')
    parser.add_argument('--minutes', type=float, default=30.0,
                        help='time budget of the whole soak, reference run included (30); '
                        'kills stop when the rest of the run would not fit')
    parser.add_argument('--atol', type=float, default=0.0,
                        help='allowed max |weight difference| (0: resume is bit-exact)')
    parser.add_argument('--work-dir', help='folder for data, runs and logs (default: a '
                        'temporary folder, removed at the end unless --keep)')
    parser.add_argument('--keep', action='store_true', help='keep the temporary folder')
    parser.add_argument('--out', help='write the results as JSON here')
    args = parser.parse_args(argv)
    settings = SoakSettings(iters=args.iters, ckpt_interval=args.ckpt_interval,
                            batch_size=args.batch_size, max_keep_ckpts=args.max_keep_ckpts,
                            seed=args.seed, threads=args.threads)
    try:
        settings.validate()
    except ValueError as err:
        parser.error(str(err))
    if args.kills < 0 or args.minutes <= 0 or args.atol < 0:
        parser.error('--kills and --atol must be >= 0 and --minutes > 0')
    if not 0.0 <= args.save_share <= 1.0:
        parser.error(f'--save-share must be in [0, 1], got {args.save_share}')

    start = time.monotonic()
    deadline = start + args.minutes * 60
    temp = args.work_dir is None
    root = tempfile.mkdtemp(prefix='eomt_soak_') if temp else osp.abspath(args.work_dir)
    os.makedirs(root, exist_ok=True)
    ref_dir, soak_dir = osp.join(root, 'reference'), osp.join(root, 'soak')
    for d in (ref_dir, soak_dir):
        if osp.exists(d) and os.listdir(d):
            parser.error(f'{d} is not empty: a soak needs fresh run folders (--resume would '
                         'continue an old run); choose another --work-dir')
        os.makedirs(d, exist_ok=True)
    import torch
    header = (f'Soak (kill -9 + --resume) of configs/eomt_lora_demo.py | {settings.iters} '
              f'iterations, checkpoint every {settings.ckpt_interval}, batch '
              f'{settings.batch_size}, keep {settings.max_keep_ckpts}, seed {settings.seed}, '
              f'{args.kills} kills planned ({round(args.kills * args.save_share)} at saves) | '
              f'CPU: {cpu_name()} | {os.cpu_count()} cores | '
              f'threads/process {settings.threads or "default"} | torch {torch.__version__} | '
              f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(header, flush=True)
    say = lambda msg: print(msg, flush=True)  # noqa: E731
    try:
        data = make_data(osp.join(root, 'data'), settings.num_train)
        options = train_options(settings, data)
        say(f'reference run ({settings.iters} iterations, uninterrupted) in {ref_dir}')
        ref = run_training(ref_dir, options, settings, [], deadline, ref_dir, say,
                           watch_saves=True)
        if not ref['finished']:
            say(f"reference run failed: {ref['failure']}")
            return 1
        iter_s = statistics.median(t for a in ref['attempts'] for t in a['iter_times'])
        windows = [w for a in ref['attempts'] for w in a['save_windows']]
        if not windows:
            say('reference run: no checkpoint save was seen on disk')
            return 1
        save_window = tuple(statistics.median(w[i] for w in windows) for i in range(3))
        plan = plan_kills(random.Random(args.seed), settings, args.kills, iter_s, save_window,
                          args.save_share)
        say(f'  {iter_s * 1000:.0f} ms per iteration; a save writes its file from '
            f'{save_window[0] * 1000:.1f} to {save_window[1] * 1000:.1f} ms after it is '
            f'announced and last_checkpoint names it at {save_window[2] * 1000:.1f} ms '
            f'(medians of {len(windows)}); soak run with {args.kills} kills in {soak_dir}')
        soak = run_training(soak_dir, options, settings, plan, deadline, soak_dir, say)
        comparison = (compare_checkpoints(ref['final_checkpoint'], soak['final_checkpoint'])
                      if soak['finished'] else None)
        wall = time.monotonic() - start
        summary = summarize(settings, soak, comparison)
        print(report(summary, soak, settings, header, wall), flush=True)

        failures = [f'reference run: {p}' for p in ref['problems']] + soak['problems']
        if soak['failure']:
            failures.append(soak['failure'])
        if comparison is not None:
            if comparison['iters'] != [settings.iters, settings.iters]:
                failures.append(f"final checkpoints are at iterations {comparison['iters']}, "
                                f'expected {settings.iters}')
            if not comparison['max_weight_diff'] <= args.atol:
                failures.append(f"weights differ from the uninterrupted run by "
                                f"{comparison['max_weight_diff']:.3g} > --atol {args.atol}: "
                                f"{comparison['differing'][:5]}")
        if soak['skipped_kills']:
            say(f"note: {soak['skipped_kills']} planned kill(s) skipped for the time budget")
        if summary['temp_files_left']:
            say(f"note: {summary['temp_files_left']} temporary file(s) of killed atomic writes "
                "were left (.<name>.<pid>.<uuid>.tmp); resume never reads them")
        for f in failures:
            say(f'FAILED: {f}')
        if args.out:
            with open(args.out, 'w') as f:
                json.dump(dict(header=header, args=vars(args), cpu=cpu_name(),
                               settings=dataclasses.asdict(settings), plan=[
                                   dataclasses.asdict(p) for p in plan],
                               iteration_s=iter_s, save_window_s=save_window,
                               summary=summary,
                               comparison=comparison, reference=ref, soak=soak,
                               failures=failures, wall_s=wall, work_dir=root), f, indent=1)
        return 1 if failures else 0
    finally:
        if temp and not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        elif temp:
            say(f'kept {root}')


if __name__ == '__main__':
    sys.exit(main())
