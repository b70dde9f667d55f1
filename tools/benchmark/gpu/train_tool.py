"""``tools/train.py --amp`` for a few iterations on the demo config, as a user runs it.

The demo data are rendered by ``tools/make_demo_data.py`` into the run's work folder, and
``tools/train.py configs/eomt_lora_demo.py --amp [fp16|bf16]`` trains on them in a subprocess
with the dataloaders pointed there, the logger at every iteration and no validation. Checked:
the exit status, one finite loss per iteration in mmengine's ``scalars.json``, the optimizer
wrapper in the config the runner dumped (``AmpOptimWrapper`` with the asked dtype on a GPU;
on a CPU the documented fall-back to ``OptimWrapper`` with its warning) and the checkpoint that
``last_checkpoint`` names.
"""
from __future__ import annotations

import glob
import json
import math
import os
import subprocess
import sys
import time
from typing import List

from bench_models import REPO

from .parts import Record, Settings

TRAIN_TOOL = os.path.join(REPO, 'tools', 'train.py')
DEMO_DATA_TOOL = os.path.join(REPO, 'tools', 'make_demo_data.py')
DEMO_CONFIG = os.path.join(REPO, 'configs', 'eomt_lora_demo.py')
# tools/train.py --amp values -> the dtype AmpOptimWrapper is given.
WRAPPER_DTYPES = {'fp16': 'float16', 'bf16': 'bfloat16'}
# Printed by eomt_mm.engine.amp.fall_back_to_fp32_on_cpu.
CPU_FALLBACK_WARNING = 'AmpOptimWrapper needs a GPU and none is available'
# MaskAnnealingHook derives its windows from max_iters and needs at least this many.
MIN_ITERS = 6


def _run(cmd: List[str], timeout: float) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=timeout)


def render_demo_data(root: str) -> str:
    """Render a small demo data set (8 train, 2 val frames) into ``root``; returns ``root``."""
    proc = _run([sys.executable, DEMO_DATA_TOOL, '--out', root, '--num-train', '8',
                 '--num-val', '2', '--num-anomaly', '0'], timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f'tools/make_demo_data.py failed (exit {proc.returncode}):\n'
                           f'{proc.stderr[-3000:]}')
    return root


def train_command(precision: str, work_dir: str, data_root: str, iters: int) -> List[str]:
    """The ``tools/train.py`` command line of one short ``--amp`` run."""
    options = [f'{loader}.dataset.data_root={data_root}'
               for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader')]
    options += [f'train_cfg.max_iters={iters}', f'param_scheduler.0.end={iters}',
                'param_scheduler.0.warmup_iters=[1,2]', 'train_dataloader.batch_size=2',
                f'default_hooks.checkpoint.interval={iters}', 'default_hooks.logger.interval=1',
                'train_cfg.val_interval=100000', 'train_cfg.val_begin=100000',
                f'experiment_name=gpu_check_{precision}']
    return [sys.executable, TRAIN_TOOL, DEMO_CONFIG, '--amp', precision, '--work-dir', work_dir,
            '--cfg-options', *options]


def read_losses(work_dir: str) -> List[float]:
    """The ``loss`` of every logged training iteration in the run's ``scalars.json``."""
    files = sorted(glob.glob(os.path.join(work_dir, '*', 'vis_data', 'scalars.json')))
    if not files:
        raise FileNotFoundError(f'no */vis_data/scalars.json under {work_dir}')
    losses = []
    with open(files[-1]) as f:
        for line in f:
            entry = json.loads(line)
            if 'loss' in entry:
                losses.append(float(entry['loss']))
    return losses


def check_run(precision: str, device: str, work_dir: str, iters: int,
              proc: subprocess.CompletedProcess, record: Record) -> None:
    """The checks of one finished ``tools/train.py`` run."""
    tag = f'--amp {precision}'
    if not record.check(f'{tag}: tools/train.py exits 0', proc.returncode == 0,
                        f'exit {proc.returncode}' + ('' if proc.returncode == 0 else
                                                     ': ' + proc.stderr[-1500:])):
        return
    losses = read_losses(work_dir)
    record.metrics[f'{precision}_losses'] = losses
    record.check(f'{tag}: a finite loss logged at each of {iters} iterations',
                 len(losses) == iters and all(math.isfinite(v) for v in losses),
                 f'{len(losses)} logged: {[round(v, 3) for v in losses]}')
    dumped = os.path.join(work_dir, os.path.basename(DEMO_CONFIG))
    with open(dumped) as f:
        text = f.read()
    if device == 'cuda':
        record.check(f'{tag}: the runner used AmpOptimWrapper({WRAPPER_DTYPES[precision]})',
                     "type='AmpOptimWrapper'" in text
                     and f"dtype='{WRAPPER_DTYPES[precision]}'" in text, dumped)
    else:
        record.check(f'{tag}: on a CPU, the documented fall-back to OptimWrapper (fp32)',
                     CPU_FALLBACK_WARNING in proc.stderr and "type='AmpOptimWrapper'" not in text,
                     'warning printed, AmpOptimWrapper absent from the dumped config')
    record_file = os.path.join(work_dir, 'last_checkpoint')
    saved = open(record_file).read().strip() if os.path.isfile(record_file) else ''
    record.check(f'{tag}: the final checkpoint is saved', bool(saved) and os.path.isfile(saved),
                 saved or f'no {record_file}')


def train_tool_amp(settings: Settings, record: Record, shared: dict) -> None:
    """Render the demo data, then one short ``tools/train.py --amp`` run per precision."""
    iters = max(MIN_ITERS, settings.amp_iters)
    data_root = render_demo_data(os.path.join(settings.work_dir, 'demo_data'))
    for precision in settings.amp_dtypes:
        work_dir = os.path.join(settings.work_dir, f'train_amp_{precision}')
        start = time.perf_counter()
        # No own timeout: the part's budget alarm interrupts the wait, and subprocess.run kills
        # the child on any exception, that one included.
        proc = _run(train_command(precision, work_dir, data_root, iters), timeout=None)
        record.metrics[f'{precision}_seconds'] = time.perf_counter() - start
        check_run(precision, settings.device, work_dir, iters, proc, record)
