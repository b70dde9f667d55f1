"""Train a segmentor from a config (mmseg's ``tools/train.py`` flags).

Examples::

    # one GPU (or the CPU)
    python tools/train.py configs/eomt_lora_b640.py
    # mixed precision: --amp is fp16, --amp bf16 uses bfloat16 (GPU only;
    # on a CPU-only machine AMP is switched off with a warning)
    python tools/train.py configs/eomt_lora_b640.py --amp bf16
    # resume from the latest checkpoint in the work dir, or from a file
    python tools/train.py CONFIG --resume
    python tools/train.py CONFIG --resume work_dirs/x/iter_4000.pth
    # several GPUs / nodes (torchrun); on a machine without GPUs GPUS=N
    # starts N CPU processes that talk over gloo
    GPUS=4 tools/dist_train.sh CONFIG

Gradient accumulation keeps the reference total batch of 16 with fewer GPUs:
it is mmengine's ``optim_wrapper.accumulative_counts`` (the optimizer steps
every N iterations, gradients summed in between; mmengine scales the loss
by 1/N), e.g. 2 GPUs x batch 2 x 4 accumulations = 16::

    python tools/train.py CONFIG \
        --cfg-options optim_wrapper.accumulative_counts=4

A config with a ``strategy`` (e.g. ``strategy=dict(type='FSDPStrategy')``)
is run by mmengine's ``FlexibleRunner`` (FSDP / DeepSpeed for backbones that
do not fit one GPU); otherwise ``Runner`` is used.
"""
from __future__ import annotations

import argparse
import os
import os.path as osp
import sys

# Running ``python tools/train.py`` puts tools/ on sys.path, not the repo
# root; make the checkout's package importable without an install.
_REPO_ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from mmengine.config import Config, DictAction  # noqa: E402
from mmengine.logging import print_log  # noqa: E402

import eomt_mm  # noqa: E402,F401  (registers the components)
from eomt_mm.engine.amp import (AMP_DTYPES, enable_amp,  # noqa: E402
                                fall_back_to_fp32_on_cpu)
from eomt_mm.engine.data_check import (check_data_folders,  # noqa: E402
                                       check_label_files)
from eomt_mm.engine.dist import prepare_cpu_distributed  # noqa: E402
from eomt_mm.engine.runner import build_runner, load_config  # noqa: E402
from eomt_mm.engine.safe_checkpoint import install_safe_checkpointing  # noqa: E402
from eomt_mm.engine.hooks import (TrainingAlreadyFinished,  # noqa: E402
                                  add_finished_run_hook, add_rng_state_hook)
# Re-exported: the --resume fallback lived here before it moved to the engine.
from eomt_mm.engine.work_dir import (checkpoint_behind_broken_record,  # noqa: E402,F401
                                     checkpoint_folders, remove_stale_temp_files)


def parse_args(argv=None) -> argparse.Namespace:
    """Parse the command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description='Train a segmentor')
    parser.add_argument('config', help='train config file path')
    parser.add_argument(
        '--work-dir', help='directory for logs and checkpoints')
    parser.add_argument(
        '--resume',
        nargs='?',
        const='auto',
        default=None,
        metavar='CHECKPOINT',
        help='resume training: without a value from the latest checkpoint '
        'in the work dir, with a value from that checkpoint file')
    parser.add_argument(
        '--amp',
        nargs='?',
        const='fp16',
        default=None,
        choices=sorted(AMP_DTYPES),
        help='automatic mixed precision (GPU): fp16 (default when the flag '
        'has no value) or bf16')
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override config settings, key=value pairs (xxx=yyy); lists as '
        'key="[a,b]", nested lists/tuples with quotes and no spaces')
    parser.add_argument(
        '--launcher',
        choices=['none', 'pytorch', 'slurm', 'mpi'],
        default='none',
        help='job launcher')
    # torch.distributed.launch passes --local-rank (newer) / --local_rank.
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args(argv)
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def build_cfg(args: argparse.Namespace) -> Config:
    """Load the config and apply the command-line switches.

    Args:
        args: Parsed arguments.

    Returns:
        The config, ready for ``Runner.from_cfg``.
    """
    cfg = load_config(args.config, args.launcher, args.cfg_options, args.work_dir)

    if args.amp is not None:
        enable_amp(cfg, args.amp)
    fall_back_to_fp32_on_cpu(cfg)

    # mmengine does not checkpoint torch's RNG; without this hook a resumed
    # run draws other dropout masks than an uninterrupted one.
    add_rng_state_hook(cfg)
    # A resumed run that already reached max_iters says so instead of finishing silently.
    add_finished_run_hook(cfg)

    if args.resume == 'auto':
        cfg.resume = True
        fallback = checkpoint_behind_broken_record(cfg.work_dir)
        if fallback is not None:
            cfg.load_from = fallback
    elif args.resume is not None:
        if not osp.isfile(args.resume):
            raise FileNotFoundError(
                f'--resume checkpoint {args.resume!r} does not exist.')
        cfg.resume = True
        cfg.load_from = args.resume
    return cfg


def main(argv=None) -> None:
    # Weights-only checkpoint loading and atomic checkpoint writes in mmengine (what changes:
    # eomt_mm/engine/safe_checkpoint.py).
    install_safe_checkpointing()
    args = parse_args(argv)
    cfg = build_cfg(args)
    # Before the Runner exists: a missing data folder then stops with the
    # folder and the way to get it, not an os.scandir error from inside
    # mmseg's dataset, and nothing is written to the work dir.
    loaders = ['train_dataloader']
    if cfg.get('val_cfg') is not None:
        loaders.append('val_dataloader')
    check_data_folders(cfg, loaders)
    # Every image's label file, also before anything is written (mmseg only opens a label
    # when its image is first sampled).
    check_label_files(cfg, loaders)
    prepare_cpu_distributed(cfg, args.launcher)
    runner = build_runner(cfg)
    if runner.rank == 0:
        # Temporary files of writers killed while saving (checkpoint-sized); only rank 0
        # writes checkpoints, so only it cleans up.
        out_dir = ((cfg.get('default_hooks') or {}).get('checkpoint') or {}).get('out_dir')
        remove_stale_temp_files(checkpoint_folders(runner.work_dir, out_dir))
    try:
        runner.train()
    except TrainingAlreadyFinished as finished:
        print_log(f'tools/train.py: {finished}', logger='current')
        return


if __name__ == '__main__':
    main()
