#!/usr/bin/env python
"""Run the whole benchmark suite in sequence and print every table.

Runs, each as its own process (so their memory figures stay separate), with the same Python:

1. ``train_step.py``: EoMT-B training step, full FT vs LoRA (and each memory lever) vs heads
   only (640, batch 1 with every variant and batch 2 with the main ones; ``--quick``: 320,
   batch 1);
   and ``memory_breakdown.py``: what fills the peak of the default LoRA's step;
2. ``inference.py``: EoMT-B inference, no LoRA / LoRA / merged LoRA / transformers' EoMT with the
   same weights, outputs checked to agree in the same run;
3. ``adapter_swap.py``: switching tasks with adapters vs rebuilding + full checkpoint;
4. ``lora_layer.py``: one LoRA layer vs PEFT vs ``nn.Linear`` (``--quick`` passed through);
5. ``anomaly_metric.py``: pooled anomaly metrics vs scikit-learn (a modest pixel count).

The kill / resume soak of a training run is a robustness test, not a benchmark:
``tests/robustness/soak.py`` (its short version runs in the test suite).

Nothing is written unless ``--out`` is given; ``--out work_dirs/bench`` keeps results out of the
source folders.

With ``--out DIR`` the scripts that write JSON put it there. The run stops at the first script
that fails (its exit status is returned), since a broken check makes the later figures moot.

    python tools/benchmark/run_all.py --quick                  # small sizes
    python tools/benchmark/run_all.py --out work_dirs/bench    # the full suite (hours on a CPU)
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from typing import List, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
# Training-step variants of the batch-2 and quick runs: the baseline, the default LoRA, LoRA with
# both checkpointing levers, a task adapter on a trained EoMT and heads only.
MAIN_VARIANTS = ('full', 'lora', 'lora_ckpt_ckdec', 'lora_task', 'heads')


def suite(quick: bool, out: Optional[str],
          threads: int = 1) -> List[Tuple[str, List[str]]]:
    """``(title, argv)`` of every script run, in order."""

    def json_out(name: str) -> List[str]:
        return ['--out', os.path.join(out, name)] if out else []

    if quick:
        train = [('training step, 320 px, batch 1',
                  ['train_step.py', '--size', '320', '--batch', '1', '--repeats', '2',
                   '--variants', *MAIN_VARIANTS, '--threads', str(threads)]
                  + json_out('train_step_320_b1.json'))]
        breakdown = ['memory_breakdown.py', '--size', '320', '--variant', 'lora']
        infer = ['inference.py', '--quick', '--threads', str(threads)]
        swap = ['adapter_swap.py', '--size', '320', '--repeats', '5']
        layer = ['lora_layer.py', '--quick']
        anomaly = ['anomaly_metric.py', '--pixels', '2000000']
    else:
        train = [('training step, 640 px, batch 1, every variant',
                  ['train_step.py', '--size', '640', '--batch', '1', '--repeats', '3', '--steps',
                   '1', '--threads', str(threads)] + json_out('train_step_640_b1.json')),
                 ('training step, 640 px, batch 2',
                  ['train_step.py', '--size', '640', '--batch', '2', '--repeats', '3', '--steps',
                   '1', '--variants', *MAIN_VARIANTS, '--threads', str(threads)]
                  + json_out('train_step_640_b2.json'))]
        breakdown = ['memory_breakdown.py', '--size', '640', '--variant', 'lora']
        infer = ['inference.py', '--size', '640', '--repeats', '5', '--steps', '3',
                 '--threads', str(threads)]
        swap = ['adapter_swap.py', '--size', '640', '--repeats', '7']
        layer = ['lora_layer.py']
        anomaly = ['anomaly_metric.py', '--pixels', '20000000']
    return train + [('live tensors at the peak of a LoRA training step', breakdown),
                    ('inference vs transformers', infer + json_out('inference.json')),
                    ('adapter swap', swap + json_out('adapter_swap.json')),
                    ('one LoRA layer', layer), ('anomaly metric vs scikit-learn', anomaly)]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--quick', action='store_true', help='small sizes, a smoke-level run')
    parser.add_argument('--out', help='folder for the JSON results (created)')
    parser.add_argument('--threads', type=int, default=1,
                        help='torch threads per training-step worker (1: robust on a shared '
                        "machine; 0: torch's choice)")
    parser.add_argument('--dry-run', action='store_true', help='print the commands only')
    args = parser.parse_args(argv)
    if args.out and not args.dry_run:
        os.makedirs(args.out, exist_ok=True)
    for title, cmd in suite(args.quick, args.out, args.threads):
        argv_full = [sys.executable, os.path.join(HERE, cmd[0])] + cmd[1:]
        shown = ' '.join(['python', os.path.join('tools', 'benchmark', cmd[0])] + cmd[1:])
        print(f'\n=== {title}: {shown}', flush=True)
        if args.dry_run:
            continue
        start = time.perf_counter()
        code = subprocess.call(argv_full)
        print(f'=== {title}: exit {code}, {time.perf_counter() - start:.0f} s', flush=True)
        if code != 0:
            return code
    return 0


if __name__ == '__main__':
    sys.exit(main())
