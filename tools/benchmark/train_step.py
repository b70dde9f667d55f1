#!/usr/bin/env python
"""Training step of EoMT-B: full fine-tuning vs LoRA vs heads only (time, memory, state, size).

Variants (see ``bench_models.VARIANTS``): ``full`` (every parameter trains), ``lora`` (the
default LoRA: rank 8 on qkv / proj / fc1 / fc2, base frozen, dropout 0.1), ``lora_p0`` (the same
with dropout 0), the memory levers one at a time and together: ``lora_ckpt`` (non-reentrant
checkpointing of the 9 blocks before the queries), ``lora_ckdec`` (checkpointing of the
decoder's predictions), ``lora_ckpt_ckdec`` (both), ``lora_ckall`` (all 12 blocks and the
decoder); ``lora_task`` (a task adapter on an already trained EoMT: the decoder is frozen too)
and ``heads`` (backbone frozen, no LoRA).

Each variant runs in its own fresh subprocess, so the process's peak RSS (``ru_maxrss``) is that
variant's alone; the variants alternate (rotated order) over ``--repeats`` rounds. A worker
builds the model with random weights, runs ``--warmup`` + ``--steps`` AdamW steps (forward with
masked attention as at the start of training, the Mask2Former set loss, backward, step) on one
fixed random batch, and reports: the median step time, the peak RSS and the RSS after building
(the difference is what training adds), trainable parameters, the optimizer-state bytes after
the first step (every AdamW state tensor), and the size on disk of what a run must save (full
FT: the whole state dict, ``torch.save``; LoRA: ``save_adapter``'s folder; heads only: the
trainable tensors, ``torch.save``). The table gives medians over repeats and ratios to full
fine-tuning measured in the same run. Step time is given as wall-clock time and as the
process's CPU time (all threads; ``time.process_time``): on a shared machine other processes
stretch the wall time, much less the CPU time, so compare ratios of the latter when the machine
is busy, and pass ``--threads 1``: with several threads, a step stalls at every parallel
region while one of its threads waits for a core, which inflates both clocks.

    python tools/benchmark/train_step.py --size 320 --repeats 2     # quick
    python tools/benchmark/train_step.py                            # 640, batch 1
    python tools/benchmark/train_step.py --batch 2 --out train_b2.json
    python tools/benchmark/train_step.py --size 320 --threads 1     # on a busy machine
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from bench_models import VARIANTS, build_eomt_b, random_batch  # noqa: E402
from bench_stats import (cpu_name, current_rss_bytes, format_table, human_bytes,  # noqa: E402
                         median, optimizer_state_bytes, peak_rss_bytes, ratios_to)

RESULT_TAG = 'TRAIN_STEP_RESULT '


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, f))
               for root, _, files in os.walk(path) for f in files)


def checkpoint_bytes(model, variant: str) -> int:
    """Bytes on disk of what a training run of ``variant`` has to save."""
    import torch
    with tempfile.TemporaryDirectory() as tmp:
        if VARIANTS[variant]['lora'] is not None:
            from eomt_mm.lora import adapters
            adapters.save_adapter(model, os.path.join(tmp, 'adapter'))
        else:
            state = model.state_dict()
            if variant != 'full':
                trainable = {n for n, p in model.named_parameters() if p.requires_grad}
                state = {k: v for k, v in state.items() if k in trainable}
            torch.save(state, os.path.join(tmp, 'model.pth'))
        return _dir_bytes(tmp)


def worker(variant: str, size: int, batch: int, warmup: int, steps: int, seed: int,
           threads: int = 0) -> dict:
    """Measure one variant in this process (call in a fresh process)."""
    import torch
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = build_eomt_b(size, variant)
    rss_built = current_rss_bytes()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05)
    imgs, samples = random_batch(size, batch, seed=seed)
    times: List[float] = []
    cpu_times: List[float] = []
    state_bytes = None
    for step in range(warmup + steps):
        start, start_cpu = time.perf_counter(), time.process_time()
        optimizer.zero_grad(set_to_none=True)
        loss, _ = model.parse_losses(model.loss(imgs, samples))
        loss.backward()
        optimizer.step()
        elapsed, elapsed_cpu = time.perf_counter() - start, time.process_time() - start_cpu
        if step >= warmup:
            times.append(elapsed)
            cpu_times.append(elapsed_cpu)
        if state_bytes is None:
            state_bytes = optimizer_state_bytes(optimizer)
    peak = peak_rss_bytes()
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in params)
    lora = sum(p.numel() for n, p in model.named_parameters()
               if p.requires_grad and ('lora_A' in n or 'lora_B' in n))
    return dict(variant=variant, size=size, batch=batch, step_s=median(times), step_times=times,
                cpu_s=median(cpu_times), cpu_times=cpu_times,
                peak_rss=peak, rss_built=rss_built, train_rss=peak - (rss_built or 0),
                params=total, trainable=trainable, lora_params=lora,
                optimizer_state=state_bytes, checkpoint=checkpoint_bytes(model, variant),
                loss=float(loss.detach()), threads=torch.get_num_threads(), torch=torch.__version__)


def run_variant(variant: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), '--worker', variant, '--size',
           str(args.size), '--batch', str(args.batch), '--warmup', str(args.warmup), '--steps',
           str(args.steps), '--seed', str(args.seed), '--threads', str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f'worker {variant} failed (exit {proc.returncode}):\n'
                           f'{proc.stderr[-4000:]}')
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    raise RuntimeError(f'worker {variant} printed no result:\n{proc.stdout[-2000:]}')


def summarise(results: Dict[str, List[dict]]) -> Dict[str, dict]:
    """Per variant: medians over repeats (time over every measured step)."""
    rows = {}
    for name, runs in results.items():
        for key in ('params', 'trainable', 'optimizer_state', 'checkpoint'):
            if len({r[key] for r in runs}) != 1:
                raise RuntimeError(f'{name}: {key} differs between repeats: '
                                   f'{[r[key] for r in runs]}')
        rows[name] = dict(
            step_s=median(t for r in runs for t in r['step_times']),
            cpu_s=median(t for r in runs for t in r['cpu_times']),
            peak_rss=median(r['peak_rss'] for r in runs),
            train_rss=median(r['train_rss'] for r in runs),
            params=runs[0]['params'], trainable=runs[0]['trainable'],
            lora_params=runs[0]['lora_params'],
            optimizer_state=runs[0]['optimizer_state'], checkpoint=runs[0]['checkpoint'])
    return rows


RATIO_KEYS = ('step_s', 'cpu_s', 'peak_rss', 'train_rss', 'trainable', 'optimizer_state', 'checkpoint')


def report(rows: Dict[str, dict], header: str) -> str:
    ratios = ratios_to(rows, 'full', RATIO_KEYS) if 'full' in rows else None

    def cell(name: str, key: str, text: str) -> str:
        return f'{text} ({ratios[name][key]:.3f}x)' if ratios else text

    table = []
    for name, r in rows.items():
        table.append([
            name,
            cell(name, 'trainable', f"{r['trainable'] / 1e6:.2f} M = "
                 f"{100 * r['trainable'] / r['params']:.2f}%"),
            f"{r['lora_params'] / 1e6:.2f} M = {100 * r['lora_params'] / r['params']:.2f}%",
            cell(name, 'step_s', f"{r['step_s']:.2f} s"),
            cell(name, 'cpu_s', f"{r['cpu_s']:.2f} s"),
            cell(name, 'peak_rss', human_bytes(r['peak_rss'])),
            cell(name, 'train_rss', human_bytes(r['train_rss'])),
            cell(name, 'optimizer_state', human_bytes(r['optimizer_state'])),
            cell(name, 'checkpoint', human_bytes(r['checkpoint'])),
        ])
    return header + '\n' + format_table(
        ['variant', 'trainable (x full)', 'of which LoRA', 'step wall time', 'step CPU time',
         'peak RSS',
         'peak RSS - RSS after build', 'optimizer state', 'checkpoint on disk'], table)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--size', type=int, default=640, help='crop side (multiple of 16)')
    parser.add_argument('--batch', type=int, default=1)
    parser.add_argument('--repeats', type=int, default=2,
                        help='rounds over all variants (fresh process per variant and round)')
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--steps', type=int, default=3, help='timed steps per worker')
    parser.add_argument('--variants', nargs='+', default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--threads', type=int, default=0,
                        help="torch threads per worker (0 = torch's choice); 1 on a busy "
                        'machine, where other processes make multi-threaded steps stall')
    parser.add_argument('--out', help='write the results as JSON here')
    parser.add_argument('--worker', choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.size <= 0 or args.size % 16:
        parser.error(f'--size must be a positive multiple of 16, got {args.size}')
    if min(args.batch, args.repeats, args.steps) < 1 or min(args.warmup, args.threads) < 0:
        parser.error('--batch, --repeats and --steps must be >= 1, --warmup and --threads >= 0')
    if args.worker:
        result = worker(args.worker, args.size, args.batch, args.warmup, args.steps, args.seed,
                        args.threads)
        print(RESULT_TAG + json.dumps(result), flush=True)
        return 0

    import torch
    header = (f'EoMT-B training step, {args.size}x{args.size}, batch {args.batch}, '
              f'{args.repeats} repeats x {args.steps} steps (+{args.warmup} warm-up) | CPU: '
              f'{cpu_name()} | {os.cpu_count()} cores | threads/worker '
              f"{args.threads or torch.get_num_threads()} | load avg {os.getloadavg()[0]:.1f}"
              f' | torch {torch.__version__} | '
              f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(header, flush=True)
    results: Dict[str, List[dict]] = {v: [] for v in args.variants}
    for rep in range(args.repeats):
        order = args.variants[rep % len(args.variants):] + args.variants[:rep %
                                                                          len(args.variants)]
        for variant in order:
            res = run_variant(variant, args)
            results[variant].append(res)
            print(f"  repeat {rep + 1} {variant:10s} step {res['step_s']:.2f} s wall, "
                  f"{res['cpu_s']:.2f} s CPU  peak RSS "
                  f"{human_bytes(res['peak_rss'])}  loss {res['loss']:.3f}", flush=True)
    rows = summarise(results)
    text = report(rows, header)
    print(text)
    print(f'  load average at the end: {os.getloadavg()[0]:.1f}')
    for name in args.variants:
        print(f"  {name}: {VARIANTS[name]['help']}")
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(dict(header=header, args=vars(args), cpu=cpu_name(), rows=rows,
                           ratios_to_full=(ratios_to(rows, 'full', RATIO_KEYS)
                                           if 'full' in rows else None),
                           runs=results), f, indent=1)
    return 0


if __name__ == '__main__':
    sys.exit(main())
