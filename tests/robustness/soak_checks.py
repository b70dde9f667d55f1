"""Checks of the soak (tests/robustness/soak.py): is a killed run's work dir safe to resume,
and do two final checkpoints hold the same numbers.
"""
from __future__ import annotations

import dataclasses
import math
import os
import os.path as osp
import re
from typing import Any, Dict, List, Optional, Tuple

__all__ = ['TEMP_RE', 'CKPT_NAME_RE', 'ScanReport', 'scan_work_dir', 'resume_point',
           'compare_checkpoints']

# The temporary name eomt_mm.utils.io.atomic_write gives a checkpoint while it is written:
# '.<final name>.<pid>.<uuid4 hex>.tmp' in the target's folder.
TEMP_RE = re.compile(r'^\.(?P<target>.+)\.(?P<pid>\d+)\.(?P<uid>[0-9a-f]{32})\.tmp$')
CKPT_NAME_RE = re.compile(r'^iter_(\d+)\.pth$')


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
    name = CKPT_NAME_RE.match(osp.basename(path))
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
        if TEMP_RE.match(name):
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
        elif TEMP_RE.match(base):
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


def resume_point(pointer: Optional[str]) -> str:
    """What ``--resume`` starts from, given the content of ``last_checkpoint``.

    Args:
        pointer: The content of ``last_checkpoint``, or None when the file does not exist.

    Returns:
        ``'scratch'``, the checkpoint's file name, or ``'(empty last_checkpoint)'``.
    """
    if pointer is None:
        return 'scratch'  # no last_checkpoint yet: mmengine starts a new run
    return osp.basename(pointer) or '(empty last_checkpoint)'


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

