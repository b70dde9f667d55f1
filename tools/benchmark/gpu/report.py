"""The check's two outputs: ``gpu_check.json`` (everything) and ``gpu_check.md`` (tables)."""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from typing import Dict, List, Sequence

import torch

from bench_stats import format_table, human_bytes
from eomt_mm.utils.io import atomic_write

from .parts import Record, Settings


def environment(settings: Settings) -> Dict[str, object]:
    """Device, library versions and the SDPA switches, for the report's header."""
    import mmcv
    import mmengine
    import mmseg
    import transformers
    env: Dict[str, object] = dict(
        date=time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()), python=platform.python_version(),
        torch=torch.__version__, transformers=transformers.__version__, mmcv=mmcv.__version__,
        mmengine=mmengine.__version__, mmseg=mmseg.__version__, device=settings.device,
        dry_run=settings.dry_run)
    if settings.device == 'cuda':
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   capability='.'.join(map(str, torch.cuda.get_device_capability(0))),
                   cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                   flash_sdp=torch.backends.cuda.flash_sdp_enabled(),
                   mem_efficient_sdp=torch.backends.cuda.mem_efficient_sdp_enabled(),
                   cudnn_sdp=torch.backends.cuda.cudnn_sdp_enabled())
    else:
        env['cpu'] = platform.processor() or platform.machine()
    return env


def write_json(path: str, env: dict, settings: Settings, records: Sequence[Record]) -> None:
    """Write every record and the run's settings as JSON (atomically)."""
    payload = dict(environment=env, settings=dataclasses.asdict(settings),
                   parts=[dataclasses.asdict(r) for r in records])

    def write(tmp: str) -> None:
        with open(tmp, 'w') as f:
            json.dump(payload, f, indent=1, default=str)

    atomic_write(path, write)


def _training_rows(records: Sequence[Record]) -> List[list]:
    full = {r.metrics['precision']: r.metrics for r in records
            if r.metrics.get('variant') == 'full' and 'peak_bytes' in r.metrics}
    rows = []
    for r in records:
        m = r.metrics
        if 'peak_bytes' not in m:
            continue
        base = full.get(m['precision'])
        ratio = f" ({m['peak_bytes'] / base['peak_bytes']:.3f}x)" if base else ''
        step_ratio = f" ({m['step_s'] / base['step_s']:.3f}x)" if base else ''
        losses = m['losses']
        rows.append([m['variant'], m['precision'], f"{m['trainable'] / 1e6:.2f} M",
                     f"{1e3 * m['step_s']:.1f} ms{step_ratio}", f"{m['images_per_s']:.1f}",
                     human_bytes(m['peak_bytes']) + ratio,
                     f'{losses[0]:.3f} -> {losses[-1]:.3f}', r.status])
    return rows


def _inference_rows(records: Sequence[Record]) -> List[list]:
    rows = []
    for r in records:
        timing = r.metrics.get('timing')
        if not timing:
            continue
        for name, t in timing.items():
            rows.append([r.name, name, f"{t['ms_per_image']:.2f} ms", f"{t['images_per_s']:.1f}",
                         f"{t['x_ours']:.3f}"])
    return rows


def markdown(env: dict, settings: Settings, records: Sequence[Record], budget_s: float) -> str:
    """The tables: parts, training runs, inference, and every failed check."""
    where = (f"{env.get('gpu')} ({env.get('gpu_memory_gib')} GiB, sm {env.get('capability')}), "
             f"CUDA {env.get('cuda')}" if settings.device == 'cuda'
             else f"CPU dry run ({env.get('cpu')}): tiny model, figures are not GPU figures")
    lines = [f"GPU check, {env['date']} | {where} | torch {env['torch']}, transformers "
             f"{env['transformers']}, mmcv {env['mmcv']}, mmseg {env['mmseg']} | "
             f'{settings.size}x{settings.size}, training batch {settings.batch}, '
             f'{settings.steps} steps | budget {budget_s:.0f} s, used '
             f'{sum(r.seconds for r in records):.0f} s', '']
    lines.append(format_table(
        ['part', 'status', 'seconds', 'checks passed'],
        [[r.name, r.status, f'{r.seconds:.1f}',
          f"{sum(c['ok'] for c in r.checks)}/{len(r.checks)}"] for r in records]))
    train = _training_rows(records)
    if train:
        lines += ['', 'Training steps (peak memory and step time: x full fine-tuning in the same '
                  'precision):', '', format_table(
                      ['config', 'autocast', 'trainable', 'step time', 'images/s',
                       'peak memory', 'loss first -> last', 'status'], train)]
    infer = _inference_rows(records)
    if infer:
        lines += ['', f'Inference, bf16, batch {settings.infer_batch} (x ours: time per image '
                  'over this project eager, same run):', '',
                  format_table(['part', 'variant', 'time / image', 'images/s', 'x ours'], infer)]
    notes = [f'- {r.name}: {n}' for r in records for n in r.notes]
    failed = [f"- {r.name}: {c['name']}: {c['detail']}" for r in records for c in r.checks
              if not c['ok']]
    failed += [f'- {r.name}: {r.error.strip().splitlines()[-1]}' for r in records if r.error]
    if notes:
        lines += ['', 'Notes:', *notes]
    if failed:
        lines += ['', 'Failed:', *failed]
    return '\n'.join(lines) + '\n'


def write_reports(out_dir: str, env: dict, settings: Settings, records: Sequence[Record],
                  budget_s: float) -> str:
    """Write ``gpu_check.json`` and ``gpu_check.md`` into ``out_dir``; returns the markdown."""
    os.makedirs(out_dir, exist_ok=True)
    write_json(os.path.join(out_dir, 'gpu_check.json'), env, settings, records)
    text = markdown(env, settings, records, budget_s)

    def write(tmp: str) -> None:
        with open(tmp, 'w') as f:
            f.write(text)

    atomic_write(os.path.join(out_dir, 'gpu_check.md'), write)
    return text
