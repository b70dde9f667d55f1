"""Mixed-precision switches of the optimizer wrapper config for the tools.

mmseg's ``tools/train.py --amp`` only knows fp16; mmengine's
``AmpOptimWrapper`` also takes ``dtype='bfloat16'``, so ``--amp bf16`` maps
to that. ``AmpOptimWrapper`` asserts an accelerator at construction, so a
config that asks for AMP must fall back to ``OptimWrapper`` on a CPU-only
machine (with a warning) instead of crashing.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from mmengine.config import Config

__all__ = ['AMP_DTYPES', 'enable_amp', 'fall_back_to_fp32_on_cpu']

#: ``--amp`` choice -> ``AmpOptimWrapper(dtype=...)``.
AMP_DTYPES = {'fp16': 'float16', 'bf16': 'bfloat16'}
# Arguments that exist only on AmpOptimWrapper.
_AMP_ONLY_KEYS = ('loss_scale', 'dtype', 'use_fsdp')


def enable_amp(cfg: Config, precision: str) -> None:
    """Turn the config's ``OptimWrapper`` into an ``AmpOptimWrapper``.

    Args:
        cfg: Config with an ``optim_wrapper`` dict; modified in place.
        precision: ``'fp16'`` (dynamic loss scaling) or ``'bf16'``.

    Raises:
        ValueError: For an unknown precision, a missing ``optim_wrapper`` or
            a wrapper type that is neither ``OptimWrapper`` nor
            ``AmpOptimWrapper``.
    """
    if precision not in AMP_DTYPES:
        raise ValueError(f'--amp expects one of {sorted(AMP_DTYPES)}, got '
                         f'{precision!r}.')
    wrapper = cfg.get('optim_wrapper')
    if wrapper is None:
        raise ValueError('--amp needs an optim_wrapper in the config.')
    kind = wrapper.get('type', 'OptimWrapper')
    if kind not in ('OptimWrapper', 'AmpOptimWrapper'):
        raise ValueError(
            f'--amp works with optim_wrapper.type OptimWrapper or '
            f'AmpOptimWrapper, but the config uses {kind!r}.')
    wrapper['type'] = 'AmpOptimWrapper'
    wrapper['dtype'] = AMP_DTYPES[precision]
    wrapper.setdefault('loss_scale', 'dynamic')


def fall_back_to_fp32_on_cpu(cfg: Config,
                             cuda_available: Optional[bool] = None) -> bool:
    """Replace ``AmpOptimWrapper`` by ``OptimWrapper`` when there is no GPU.

    Args:
        cfg: Config whose ``optim_wrapper`` may be an ``AmpOptimWrapper``;
            modified in place.
        cuda_available: Override for ``torch.cuda.is_available()`` (tests).

    Returns:
        True if the wrapper was replaced.
    """
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    wrapper = cfg.get('optim_wrapper')
    if cuda_available or wrapper is None or wrapper.get(
            'type') != 'AmpOptimWrapper':
        return False
    warnings.warn(
        'AmpOptimWrapper needs a GPU and none is available: training in fp32 '
        'with OptimWrapper instead (mixed precision is ignored on CPU).',
        stacklevel=2)
    wrapper['type'] = 'OptimWrapper'
    for key in _AMP_ONLY_KEYS:
        wrapper.pop(key, None)
    return True
