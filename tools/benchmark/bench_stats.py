"""Arithmetic and reporting helpers shared by the benchmark scripts in this folder.

Kept apart from the scripts so that the numbers they publish (medians, ratios to a baseline,
optimizer-state bytes) are computed by small functions that ``tests/test_benchmark_helpers.py``
checks.
"""
from __future__ import annotations

import math
import platform
import resource
import statistics
from typing import Dict, Iterable, List, Mapping, Optional, Sequence

import torch


def cpu_name() -> str:
    """The CPU model from ``/proc/cpuinfo`` (Linux), else what ``platform`` knows."""
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or 'unknown CPU'


def median(values: Iterable[float]) -> float:
    """Median of a non-empty sequence of numbers (clear error when empty or not finite)."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError('median of an empty sequence: no measurement was taken')
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f'median: non-finite measurement in {values}')
    return statistics.median(values)


def ratio(value: float, baseline: float) -> float:
    """``value / baseline``; a zero baseline is an error (the reference measured nothing)."""
    if baseline == 0:
        raise ZeroDivisionError('ratio to a baseline of 0: the reference variant measured 0')
    return float(value) / float(baseline)


def ratios_to(rows: Mapping[str, Mapping[str, float]], baseline: str,
              keys: Sequence[str]) -> Dict[str, Dict[str, float]]:
    """Per row, ``rows[name][key] / rows[baseline][key]`` for each of ``keys``.

    Args:
        rows: Variant name -> measured quantities.
        baseline: The variant every other one is divided by.
        keys: The quantities to compare.

    Returns:
        Variant name -> key -> ratio (the baseline's own ratios are 1).
    """
    if baseline not in rows:
        raise KeyError(f'baseline variant {baseline!r} not measured; have {sorted(rows)}')
    return {name: {k: ratio(row[k], rows[baseline][k]) for k in keys}
            for name, row in rows.items()}


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimizer's per-parameter state (AdamW: ``exp_avg``,
    ``exp_avg_sq`` and the ``step`` counter); 0 before the first step."""
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                total += value.numel() * value.element_size()
    return total


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (``ru_maxrss``, KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> Optional[int]:
    """Current resident set size (``VmRSS`` of ``/proc/self/status``), None off Linux."""
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('VmRSS:'):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def human_bytes(n: float) -> str:
    """``1536 -> '1.5 KiB'`` (binary units)."""
    for unit in ('B', 'KiB', 'MiB', 'GiB'):
        if abs(n) < 1024 or unit == 'GiB':
            return f'{n:.0f} {unit}' if unit == 'B' else f'{n:.1f} {unit}'
        n /= 1024
    raise AssertionError('unreachable')


def format_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-markdown table with columns padded to their widest cell."""
    cells: List[List[str]] = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    if any(len(r) != len(header) for r in cells):
        raise ValueError('format_table: every row needs one cell per header column')
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

    def line(r: Sequence[str]) -> str:
        return '| ' + ' | '.join(c.ljust(w) for c, w in zip(r, widths)) + ' |'

    return '\n'.join([line(cells[0]), '|' + '|'.join('-' * (w + 2) for w in widths) + '|']
                     + [line(r) for r in cells[1:]])
