"""Choosing the runner a config asks for (shared by tools/train.py and tools/test.py)."""
import logging
import os.path as osp
from typing import Optional

from mmengine.config import Config
from mmengine.logging import print_log
from mmengine.registry import RUNNERS
from mmengine.runner import FlexibleRunner, Runner


def load_config(config: str, launcher: str, cfg_options: Optional[dict] = None,
                work_dir: Optional[str] = None) -> Config:
    """The config of a ``tools/train.py`` / ``tools/test.py`` run, as mmseg's tools load it.

    Args:
        config: Config file path.
        launcher: ``none``, ``pytorch``, ``slurm`` or ``mpi``.
        cfg_options: ``--cfg-options`` overrides, merged into the config.
        work_dir: ``--work-dir``; otherwise the config's, else ``./work_dirs/<config name>``.

    Returns:
        The loaded config.

    Raises:
        FileNotFoundError: If ``config`` is not a file.
    """
    if not osp.isfile(config):
        raise FileNotFoundError(f'Config file {config!r} does not exist.')
    cfg = Config.fromfile(config)
    cfg.launcher = launcher
    if cfg_options is not None:
        cfg.merge_from_dict(cfg_options)
    if work_dir is not None:
        cfg.work_dir = work_dir
    elif cfg.get('work_dir', None) is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(config))[0])
    return cfg


def warn_single_kept_checkpoint(cfg: Config) -> bool:
    """Warn when ``CheckpointHook`` keeps a single checkpoint.

    mmengine's ``CheckpointHook`` deletes the oldest kept checkpoint *before* writing the new
    one; with ``max_keep_ckpts=1`` that is the only checkpoint, so a run killed during a save
    is left with none to resume from (found by killing training runs at random moments).
    With safe checkpointing installed (:mod:`eomt_mm.engine.safe_checkpoint`) writes are
    atomic, so with 2 or more kept the previous one always survives.

    Args:
        cfg: A complete experiment config.

    Returns:
        True when the warning was given.
    """
    hook = (cfg.get('default_hooks') or {}).get('checkpoint') or {}
    if hook.get('max_keep_ckpts', -1) != 1:
        return False
    print_log('default_hooks.checkpoint.max_keep_ckpts=1: mmengine deletes the previous '
              'checkpoint before writing the next one, so a run killed during a save has no '
              'checkpoint left to resume from; keep 2 or more.', logger='current',
              level=logging.WARNING)
    return True


def build_runner(cfg: Config):
    """Build the config's ``runner_type``, else ``FlexibleRunner`` when the config has a
    ``strategy`` (FSDP, DeepSpeed, ...), else the plain ``Runner``.

    Args:
        cfg: A complete experiment config.

    Returns:
        The runner, not yet started.
    """
    warn_single_kept_checkpoint(cfg)
    if 'runner_type' in cfg:
        return RUNNERS.build(cfg)
    if cfg.get('strategy') is not None:
        return FlexibleRunner.from_cfg(cfg)
    return Runner.from_cfg(cfg)
