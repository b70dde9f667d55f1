"""Launcher helper: multi-process training on machines without GPUs.

mmengine's ``init_dist('pytorch')`` calls ``torch.cuda.set_device`` before
creating the process group, which fails without a GPU, and its DDP wrappers
pass ``device_ids`` that torch rejects for CPU modules. ``Runner.setup_env``
(and ``DDPStrategy._setup_distributed`` of ``FlexibleRunner``) only call
``init_dist`` when ``torch.distributed`` is not initialised yet, so the tools
create the gloo process group themselves before building the runner, and
point the config at
:class:`~eomt_mm.engine.ddp.CpuAwareDistributedDataParallel`.
With GPUs nothing here changes mmengine's behaviour.
"""
from __future__ import annotations

import datetime
import os
from typing import Optional

import torch
import torch.distributed as torch_dist
from mmengine.config import Config, ConfigDict

__all__ = ['prepare_cpu_distributed']

_WRAPPER = 'CpuAwareDistributedDataParallel'
# Wrapper types that are plain DDP underneath and can be swapped for ours.
_REPLACEABLE_WRAPPERS = (None, 'MMDistributedDataParallel',
                         'mmengine.MMDistributedDataParallel', _WRAPPER)
_TORCHRUN_VARS = ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR',
                  'MASTER_PORT')


def _use_cpu_wrapper(wrapper_cfg: Optional[dict], where: str) -> ConfigDict:
    """Return ``wrapper_cfg`` with its type switched to the CPU-aware DDP.

    Args:
        wrapper_cfg: The config's wrapper dict (may be None).
        where: Name of the config field, for the error message.

    Returns:
        The new wrapper config (``broadcast_buffers=False`` by default, as
        mmengine uses for OpenMMLab models).

    Raises:
        ValueError: If the config asks for a wrapper that is not plain DDP.
    """
    wrapper_cfg = ConfigDict(wrapper_cfg or {})
    if wrapper_cfg.get('type') not in _REPLACEABLE_WRAPPERS:
        raise ValueError(
            f'{where}.type={wrapper_cfg.get("type")!r} cannot run on CPU '
            f'processes; distributed CPU training supports {_WRAPPER} (plain '
            'DDP). Remove the custom wrapper or run on GPUs.')
    wrapper_cfg['type'] = _WRAPPER
    wrapper_cfg.setdefault('broadcast_buffers', False)
    return wrapper_cfg


def prepare_cpu_distributed(cfg: Config, launcher: str) -> bool:
    """Make a ``pytorch``-launched run work on CPU processes (gloo).

    Does nothing (returns False) when ``launcher`` is ``'none'`` or a GPU is
    available. Otherwise, for ``launcher='pytorch'`` (torchrun), it creates
    the gloo process group from torchrun's environment, sets
    ``cfg.env_cfg.dist_cfg.backend='gloo'`` and switches the DDP wrapper
    (``cfg.model_wrapper_cfg`` for ``Runner``, ``cfg.strategy.model_wrapper``
    for ``FlexibleRunner`` with ``DDPStrategy``) to
    ``CpuAwareDistributedDataParallel``, keeping ``find_unused_parameters``.

    Args:
        cfg: The full config; modified in place.
        launcher: ``'none'``, ``'pytorch'``, ``'slurm'`` or ``'mpi'``.

    Returns:
        True if the CPU distributed set-up was applied.

    Raises:
        ValueError: For ``slurm``/``mpi`` without GPUs, for FSDP/DeepSpeed
            strategies on CPU, or for a non-DDP custom wrapper.
        RuntimeError: If torchrun's environment variables are missing.
    """
    if launcher == 'none' or torch.cuda.is_available():
        return False
    if launcher != 'pytorch':
        raise ValueError(
            f'--launcher {launcher} needs GPUs (mmengine sets a CUDA device '
            'for it); on a machine without GPUs start the processes with '
            'torchrun (tools/dist_train.sh) and --launcher pytorch.')
    missing = [var for var in _TORCHRUN_VARS if var not in os.environ]
    if missing:
        raise RuntimeError(
            f'--launcher pytorch expects torchrun environment variables, '
            f'missing: {missing}. Start with tools/dist_train.sh or torchrun.')

    env_cfg = cfg.setdefault('env_cfg', ConfigDict())
    dist_cfg = env_cfg.setdefault('dist_cfg', ConfigDict())
    dist_cfg['backend'] = 'gloo'

    strategy = cfg.get('strategy')
    if strategy is not None:
        strategy_type = strategy.get('type', 'DDPStrategy') if isinstance(
            strategy, dict) else type(strategy).__name__
        if strategy_type != 'DDPStrategy':
            raise ValueError(
                f'strategy {strategy_type!r} needs GPUs; on CPU processes '
                'only DDPStrategy (or the plain Runner) is supported.')
        strategy['model_wrapper'] = _use_cpu_wrapper(
            strategy.get('model_wrapper'), 'strategy.model_wrapper')
    else:
        wrapper_cfg = _use_cpu_wrapper(
            cfg.get('model_wrapper_cfg'), 'model_wrapper_cfg')
        # Runner passes find_unused_parameters only when it builds the
        # default wrapper itself; keep the config's choice with ours.
        wrapper_cfg.setdefault('find_unused_parameters',
                               cfg.get('find_unused_parameters', False))
        cfg['model_wrapper_cfg'] = wrapper_cfg

    if not torch_dist.is_initialized():
        kwargs = {}
        timeout = dist_cfg.get('timeout')
        if timeout is not None:
            kwargs['timeout'] = datetime.timedelta(seconds=timeout)
        torch_dist.init_process_group(
            backend='gloo',
            init_method='env://',
            rank=int(os.environ['RANK']),
            world_size=int(os.environ['WORLD_SIZE']),
            **kwargs)
    return True
