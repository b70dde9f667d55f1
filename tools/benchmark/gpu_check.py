#!/usr/bin/env python
"""One-call GPU check: everything the GPU side of this project claims, in one timed run.

Parts, in order (each timed and guarded: a failing part is reported and the others still run):

* ``train_{lora,full,lowmem}_{bf16,fp16}``: ``--steps`` training steps of the LoRA fine-tuning
  experiment (``configs/eomt_lora_b640.py``), full fine-tuning (``configs/eomt_full_b640.py``)
  and the low-memory config (``configs/eomt_lora_b640_lowmem.py``): EoMT-B/16 at ``--size``,
  batch ``--batch``, fp16 and bf16 autocast through the configs' optimizer wrappers made
  ``AmpOptimWrapper`` as ``tools/train.py --amp`` does. Checked: loss finite at every step and
  lower over the last quarter than over the first, LoRA matrices trained and the frozen base
  untouched; measured: peak memory (``torch.cuda.max_memory_allocated``), step time, images/s.
* ``train_memory``: peak memory of LoRA and of the low-memory config as ratios to full
  fine-tuning in the same precision (checked: LoRA below full, low-memory below LoRA).
* ``inference_eager``: this project's EoMT (no LoRA and merged LoRA) against transformers'
  ``EomtForUniversalSegmentation`` with the same weights (converted by ``tools/convert_weights.py
  --format hf-eomt``): outputs checked in fp32 and bf16, bf16 images/s side by side.
* ``sdpa_kernel``: inference under ``sdpa_kernel([FLASH_ATTENTION, EFFICIENT_ATTENTION])`` and a
  profile of the attention ops: a fused kernel in every block, never the math fallback.
* ``train_tool_amp``: ``tools/train.py configs/eomt_lora_demo.py --amp fp16`` (and ``bf16``) for
  a few iterations on demo data rendered by ``tools/make_demo_data.py``.
* ``inference_compile``: ``torch.compile`` of ours and of transformers' model, compile time,
  graph breaks, outputs against eager, images/s next to eager.

Writes ``gpu_check.json`` and ``gpu_check.md`` into ``--out`` after every part. Exit status: 0
when every check passed, 1 when a check failed or a part raised or ran out of time, 2 when
nothing failed but a part was skipped for lack of budget (``--budget``, total seconds).

``--dry-run`` runs the same code paths on the CPU with a tiny model (4 blocks of width 64) at
64 px: bf16 autocast on the CPU, fp16 (GradScaler) not run, ``torch.compile`` with the
``eager`` backend (graph capture without code generation), CPU live-tensor bytes for memory.
It is part of the test suite (``tests/test_gpu_check.py``). On the device machine the check is
run by ``tools/benchmark/gpu_check.sh`` (which first installs the stack from carried wheels).

    python tools/benchmark/gpu_check.py --out work_dirs/gpu_check          # on a GPU
    python tools/benchmark/gpu_check.py --dry-run --out /tmp/gpu_dry        # rehearsal on CPU
    python tools/benchmark/gpu_check.py --parts train_lora_bf16 sdpa_kernel --budget 120
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import List, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)
REPO_ROOT = os.path.dirname(os.path.dirname(HERE))
if REPO_ROOT not in sys.path:  # eomt_mm from the checkout without an install
    sys.path.insert(1, REPO_ROOT)

import torch  # noqa: E402

from gpu import attention, speed, train_tool, training  # noqa: E402
from gpu.parts import Part, Settings, exit_code, run_parts  # noqa: E402
from gpu.report import environment, write_reports  # noqa: E402

# Seconds each part needs (GPU, dry run): a part starts only with that much budget left.
PARTS: List[Part] = [
    *[Part(f'train_{variant}_{precision}', training.make_train_part(variant, precision),
           estimate_s=30 if variant != 'lowmem' else 40, estimate_dry_s=3,
           title=f'{variant} training steps, {precision} autocast')
      for variant in ('lora', 'full', 'lowmem') for precision in ('bf16', 'fp16')],
    Part('train_memory', training.memory_ratios, 0, 0, 'peak memory ratios to full fine-tuning'),
    Part('inference_eager', speed.eager, 45, 10, 'bf16 eager inference against transformers'),
    Part('sdpa_kernel', attention.sdpa_check, 10, 2, 'fused SDPA kernel at inference'),
    Part('train_tool_amp', train_tool.train_tool_amp, 60, 25, 'tools/train.py --amp, demo'),
    Part('inference_compile', speed.compiled, 150, 10, 'torch.compile inference'),
]
PART_NAMES = [p.name for p in PARTS]
# Default sizes: the on a GPU; a few seconds per part on a CPU for the dry run.
GPU_DEFAULTS = dict(size=640, batch=8, steps=20, warmup=2, infer_batch=1, infer_repeats=5,
                    infer_steps=10, compile_backend='inductor', amp_iters=10,
                    amp_dtypes=('fp16', 'bf16'), lr=None, budget=420.0)
DRY_DEFAULTS = dict(size=64, batch=2, steps=8, warmup=1, infer_batch=1, infer_repeats=2,
                    infer_steps=2, compile_backend='eager', amp_iters=6, amp_dtypes=('fp16', ),
                    lr=1e-3, budget=300.0)
# The dry run's tiny EoMT: 4 blocks (queries before the last 3, as in EoMT-B), width 64.
TINY_ARCH = dict(embed_dims=64, num_layers=4, num_heads=2, feedforward_channels=256)
TINY_DECODER = dict(num_queries=8, num_points=256)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--dry-run', action='store_true',
                        help='CPU rehearsal: tiny model, same code paths (seconds per part)')
    parser.add_argument('--out', default=os.path.join('work_dirs', 'gpu_check'),
                        help='folder for gpu_check.json and gpu_check.md')
    parser.add_argument('--budget', type=float, default=None,
                        help=f"total seconds for all parts (default {GPU_DEFAULTS['budget']:g}; "
                        f"dry run {DRY_DEFAULTS['budget']:g})")
    parser.add_argument('--parts', nargs='+', choices=PART_NAMES, default=None,
                        help='run only these parts (in the fixed order); default all')
    parser.add_argument('--size', type=int, default=None, help='image side, multiple of 16')
    parser.add_argument('--batch', type=int, default=None, help='training batch')
    parser.add_argument('--steps', type=int, default=None, help='training steps per run')
    parser.add_argument('--infer-batch', type=int, default=None, help='images per inference call')
    parser.add_argument('--compile-backend', default=None,
                        help="torch.compile backend (default 'inductor'; dry run 'eager')")
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)
    defaults = DRY_DEFAULTS if args.dry_run else GPU_DEFAULTS
    for key in ('budget', 'size', 'batch', 'steps', 'infer_batch', 'compile_backend'):
        if getattr(args, key) is None:
            setattr(args, key, defaults[key])
    if args.size <= 0 or args.size % 16:
        parser.error(f'--size must be a positive multiple of the patch size 16, got {args.size}')
    if min(args.batch, args.infer_batch) < 1 or args.steps < 4:
        parser.error('--batch and --infer-batch must be >= 1 and --steps >= 4 (the loss is '
                     'compared over the first and last quarter)')
    if args.budget <= 0:
        parser.error(f'--budget must be positive, got {args.budget:g}')
    return args


def make_settings(args: argparse.Namespace, work_dir: str) -> Settings:
    """The run's :class:`Settings` from the arguments and the defaults of the mode."""
    defaults = DRY_DEFAULTS if args.dry_run else GPU_DEFAULTS
    return Settings(
        device='cpu' if args.dry_run else 'cuda', dry_run=args.dry_run, size=args.size,
        batch=args.batch, steps=args.steps, warmup=min(defaults['warmup'], args.steps - 1),
        infer_batch=args.infer_batch, infer_repeats=defaults['infer_repeats'],
        infer_steps=defaults['infer_steps'], compile_backend=args.compile_backend,
        amp_iters=defaults['amp_iters'], amp_dtypes=tuple(defaults['amp_dtypes']),
        lr=defaults['lr'], seed=args.seed,
        backbone_arch=dict(TINY_ARCH) if args.dry_run else None,
        decoder_overrides=dict(TINY_DECODER) if args.dry_run else {}, work_dir=work_dir)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the check; returns the exit status (see the module docstring)."""
    args = parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print('gpu_check: no CUDA device is visible; run it on a GPU machine, or pass '
              '--dry-run for the CPU rehearsal', file=sys.stderr)
        return 2
    from mmengine.registry import init_default_scope
    init_default_scope('mmseg')
    parts = [p for p in PARTS if args.parts is None or p.name in args.parts]
    threads = torch.get_num_threads()
    if args.dry_run:
        # The tiny model's ops gain nothing from threads, and on a busy machine every parallel
        # region stalls while one of its threads waits for a core.
        torch.set_num_threads(1)
    try:
        records = _run(args, parts)
    finally:
        torch.set_num_threads(threads)
    return exit_code(records)


def _run(args: argparse.Namespace, parts: List[Part]) -> list:
    """Run ``parts`` in a temporary work folder, writing the reports after each one."""
    with tempfile.TemporaryDirectory(prefix='gpu_check_') as work_dir:
        settings = make_settings(args, work_dir)
        env = environment(settings)
        print(f"gpu_check: {'CPU dry run' if args.dry_run else env.get('gpu')}, "
              f'{len(parts)} parts, budget {args.budget:.0f} s', flush=True)

        def after_each(records) -> None:
            last = records[-1]
            print(f'  {last.name:18s} {last.status:14s} {last.seconds:6.1f} s  '
                  + '; '.join(f"{'ok' if c['ok'] else 'FAILED'}: {c['name']}"
                              for c in last.checks), flush=True)
            write_reports(args.out, env, settings, records, args.budget)

        records = run_parts(parts, settings, args.budget, after_each)
        text = write_reports(args.out, env, settings, records, args.budget)
    print(text)
    print(f"written: {os.path.join(args.out, 'gpu_check.json')}, "
          f"{os.path.join(args.out, 'gpu_check.md')}")
    return records


if __name__ == '__main__':
    sys.exit(main())
