"""Evaluate a checkpoint with a config (mmseg's ``tools/test.py`` flags).

Examples::

    python tools/test.py CONFIG work_dirs/x/iter_4000.pth
    # paint predictions into a folder, and keep the raw predictions as PNGs
    python tools/test.py CONFIG CKPT --show-dir vis --out preds
    # several GPUs, or several CPU processes (gloo) on a machine without GPUs
    GPUS=2 tools/dist_test.sh CONFIG CKPT

The checkpoint is loaded through mmengine with ``weights_only=True`` (the tool installs
``eomt_mm.engine.safe_checkpoint``); a file that pickles anything else is refused.
"""
from __future__ import annotations

import argparse
import os
import os.path as osp
import sys

# Running ``python tools/test.py`` puts tools/ on sys.path, not the repo root;
# make the checkout's package importable without an install.
_REPO_ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from mmengine.config import Config, ConfigDict, DictAction  # noqa: E402

import eomt_mm  # noqa: E402,F401  (registers the components)
from eomt_mm.engine.data_check import (check_data_folders,  # noqa: E402
                                       check_label_files)
from eomt_mm.engine.dist import prepare_cpu_distributed  # noqa: E402
from eomt_mm.engine.hooks import add_lora_config_check_hook  # noqa: E402
from eomt_mm.engine.runner import build_runner, load_config  # noqa: E402
from eomt_mm.engine.safe_checkpoint import install_safe_checkpointing  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    """Parse the command line (see the module docstring)."""
    parser = argparse.ArgumentParser(
        description='Evaluate a segmentor checkpoint')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument(
        '--work-dir',
        help='directory for the evaluation log and metrics')
    parser.add_argument(
        '--out',
        help='directory where the evaluator writes the predicted label maps '
        '(IoUMetric output_dir), e.g. for offline evaluation or submission')
    parser.add_argument(
        '--show', action='store_true', help='show prediction results')
    parser.add_argument(
        '--show-dir',
        help='directory where painted predictions are saved (every image)')
    parser.add_argument(
        '--wait-time', type=float, default=2, help='seconds per shown image')
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override config settings, key=value pairs (xxx=yyy)')
    parser.add_argument(
        '--launcher',
        choices=['none', 'pytorch', 'slurm', 'mpi'],
        default='none',
        help='job launcher')
    parser.add_argument(
        '--tta', action='store_true', help='test-time augmentation '
        '(the config must define tta_model and tta_pipeline)')
    parser.add_argument(
        '--lora-from-config', action='store_true',
        help="use the config's lora_config even where the checkpoint was trained with "
        'other LoRA settings (lora_alpha, use_rslora, rank, targets, ...); without it '
        'such a checkpoint is refused')
    # torch.distributed.launch passes --local-rank (newer) / --local_rank.
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args(argv)
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def _enable_visualization(cfg: Config, args: argparse.Namespace) -> None:
    """Switch the config's visualization hook on for --show / --show-dir."""
    hooks = cfg.get('default_hooks') or ConfigDict()
    if 'visualization' not in hooks:
        raise RuntimeError(
            '--show/--show-dir need a visualization hook in the config: '
            "default_hooks.visualization=dict(type='SegVisualizationHook').")
    hook = hooks['visualization']
    hook['draw'] = True
    if args.show:
        hook['show'] = True
        hook['wait_time'] = args.wait_time
    if args.show_dir:
        # The hook draws every ``interval``-th image; a folder of painted
        # predictions is only useful with all of them.
        hook['interval'] = 1
        cfg.visualizer['save_dir'] = args.show_dir


def build_cfg(args: argparse.Namespace) -> Config:
    """Load the config and apply the command-line switches.

    Args:
        args: Parsed arguments.

    Returns:
        The config, ready for ``Runner.from_cfg``.
    """
    for what, path in (('Config', args.config),
                       ('Checkpoint', args.checkpoint)):
        if not osp.isfile(path):
            raise FileNotFoundError(f'{what} file {path!r} does not exist.')
    cfg = load_config(args.config, args.launcher, args.cfg_options, args.work_dir)

    cfg.load_from = args.checkpoint
    cfg.resume = False
    if not args.lora_from_config:
        # LoRA's scaling is not in the weights: compare the checkpoint's training
        # lora_config with the config's before evaluating (eomt_mm/engine/lora_record.py).
        add_lora_config_check_hook(cfg)

    if args.show or args.show_dir:
        _enable_visualization(cfg, args)

    if args.tta:
        if 'tta_model' not in cfg or 'tta_pipeline' not in cfg:
            raise ValueError('--tta needs tta_model and tta_pipeline in the '
                             'config.')
        cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline
        cfg.tta_model.module = cfg.model
        cfg.model = cfg.tta_model

    if args.out is not None:
        evaluators = cfg.test_evaluator if isinstance(
            cfg.test_evaluator, list) else [cfg.test_evaluator]
        for evaluator in evaluators:
            evaluator['output_dir'] = args.out
    return cfg


def main(argv=None) -> dict:
    # Weights-only checkpoint loading and atomic checkpoint writes in mmengine (what changes:
    # eomt_mm/engine/safe_checkpoint.py).
    install_safe_checkpointing()
    args = parse_args(argv)
    cfg = build_cfg(args)
    # A missing data folder stops here with the folder and how to get it
    # (see eomt_mm/engine/data_check.py for why this is not left to mmseg).
    check_data_folders(cfg, ['test_dataloader'])
    # Every image's label file, before the evaluation starts (mmseg opens a label only when
    # its image comes up).
    check_label_files(cfg, ['test_dataloader'])
    prepare_cpu_distributed(cfg, args.launcher)
    runner = build_runner(cfg)
    return runner.test()


if __name__ == '__main__':
    main()
