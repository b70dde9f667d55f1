"""Where the time goes: a side-by-side operator profile of several implementations of one call.

``torch.profiler`` records each variant over a few calls; the table lists, per ATen operator (and
input shapes with ``by_shape=True``), the self CPU time per call of every variant, sorted by the
largest time any variant spends in it, so that a slower variant's excess shows up as the rows
where it differs.

    rows = op_profile({'ours': f, 'hf': g}, x, calls=2)
    print(format_profile(rows, ['ours', 'hf'], top=20))
"""
from __future__ import annotations

from typing import Callable, Dict, List, Mapping, Sequence, Tuple

import torch
from torch import Tensor

from bench_stats import format_table

Key = Tuple[str, str]


def op_profile(fns: Mapping[str, Callable[[Tensor], object]], x: Tensor, calls: int = 2,
               by_shape: bool = False) -> Dict[str, Dict[Key, Tuple[float, int]]]:
    """Profile each variant on ``x`` and total the self CPU time per operator.

    Args:
        fns: Variant name -> the call to profile (already warmed up by the caller).
        x: The input.
        calls: Calls per variant inside the profiler; times are divided by it.
        by_shape: Key the rows by operator and input shapes instead of operator only.

    Returns:
        Variant -> ``{(operator, shapes): (self CPU seconds per call, calls per call)}``;
        ``shapes`` is ``''`` unless ``by_shape``.
    """
    from torch.profiler import ProfilerActivity, profile
    if calls < 1:
        raise ValueError(f'op_profile: calls must be >= 1, got {calls}')
    result = {}
    with torch.inference_mode():
        for name, fn in fns.items():
            with profile(activities=[ProfilerActivity.CPU], record_shapes=by_shape) as prof:
                for _ in range(calls):
                    fn(x)
            table = {}
            for event in prof.key_averages(group_by_input_shape=by_shape):
                key = (event.key, str(event.input_shapes) if by_shape else '')
                seconds = event.self_cpu_time_total / 1e6 / calls
                count = event.count / calls
                old = table.get(key, (0.0, 0))
                table[key] = (old[0] + seconds, old[1] + count)
            result[name] = table
    return result


def format_profile(rows: Mapping[str, Mapping[Key, Tuple[float, int]]], names: Sequence[str],
                   top: int = 20) -> str:
    """The ``top`` operators by self time (largest over the variants), side by side.

    Args:
        rows: From :func:`op_profile`.
        names: Variants to show, in this column order.
        top: Rows shown (the rest are summed in an ``(other)`` row).

    Returns:
        A markdown table: operator, shapes, then per variant ``ms (calls)``, and the total.
    """
    keys = set()
    for name in names:
        keys.update(rows[name])
    # By the largest time any variant spends in the operator, so that an operator only one
    # variant runs (e.g. a convolution the other computes as a matrix product) is not hidden.
    ordered: List[Key] = sorted(
        keys, key=lambda k: (-max(rows[n].get(k, (0.0, 0))[0] for n in names), k))
    shown, rest = ordered[:top], ordered[top:]

    def cell(name: str, key_list: Sequence[Key]) -> str:
        seconds = sum(rows[name].get(k, (0.0, 0))[0] for k in key_list)
        count = sum(rows[name].get(k, (0.0, 0))[1] for k in key_list)
        return f'{seconds * 1e3:.1f} ({count:g})'

    table = [[key[0], key[1] or '-', *[cell(name, [key]) for name in names]] for key in shown]
    if rest:
        table.append(['(other)', '-', *[cell(name, rest) for name in names]])
    table.append(['total', '-', *[cell(name, ordered) for name in names]])
    return format_table(['operator', 'input shapes', *[f'{n}: self CPU ms / call (calls)'
                                                       for n in names]], table)
