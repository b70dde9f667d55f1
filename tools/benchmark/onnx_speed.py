#!/usr/bin/env python
"""EoMT-B/16 inference: onnxruntime (CPU) on the exported graph vs PyTorch eager, same weights.

The model is the LoRA fine-tuning experiment's (``configs/eomt_lora_b640.py``; ``--backbone
dinov3``: its DINOv3 version) with random weights and seeded random ``lora_B`` (a live
adapter), merged with ``merge_lora`` and wrapped in :class:`eomt_mm.export.ExportableEoMT`
(normalisation, per-pixel class scores and the ``--scores`` anomaly maps in the graph), then
exported with :func:`eomt_mm.export.export_onnx` at ``--size`` (fixed size) into a temporary
folder. Both variants run that one module: ``torch`` calls it eagerly under
``torch.inference_mode()``, ``onnxruntime`` runs the file with the CPU execution provider
(``intra_op_num_threads = --threads``, sequential execution); ``torch.set_num_threads(--threads)``.

Before timing, the outputs of the two are compared on the benchmark input (and the export fails
when an output differs by more than 1e-4 relative to its largest value); the maximum differences
are printed. Timing: ``tools/benchmark/inference.py``'s rotated rounds (``--repeats`` rounds of
``--steps`` calls per variant after ``--warmup`` calls each), medians per image, ratios to
``torch`` from the medians and per round. Compare ratios, not absolute times.

    python tools/benchmark/onnx_speed.py --threads 1                 # 640, msp + rba maps
    python tools/benchmark/onnx_speed.py --backbone dinov3 --scores
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from typing import Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from bench_stats import cpu_name  # noqa: E402
from inference import (BACKBONES, default_model_configs, randomize_lora_b_, report,  # noqa: E402
                       summarise, time_variants)

import torch  # noqa: E402

BASELINE = 'torch'
TOLERANCE = 1e-4


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse the command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description='onnxruntime vs PyTorch eager inference')
    parser.add_argument('--size', type=int, default=640, help='square input side (px)')
    parser.add_argument('--backbone', choices=sorted(BACKBONES), default='dinov2')
    parser.add_argument('--scores', nargs='*', default=['msp', 'rba'],
                        help='anomaly maps in the graph (none: class scores only)')
    parser.add_argument('--threads', type=int, default=1, help='threads of both runtimes')
    parser.add_argument('--batch', type=int, default=1)
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--steps', type=int, default=3)
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--out', help='write the rows as JSON here')
    return parser.parse_args(argv)


def build_module(size: int, backbone: str, scores: Sequence[str], seed: int):
    """The merged random EoMT-B/16 wrapped for export (ImageNet normalisation, RGB input)."""
    from mmengine.registry import init_default_scope
    from mmseg.registry import MODELS

    import eomt_mm  # noqa: F401  registers the models
    from eomt_mm.export import ExportableEoMT, InputNormalization
    from eomt_mm.lora import merge_lora
    init_default_scope('mmseg')
    model_cfg, lora_config = default_model_configs(size, backbone)
    torch.manual_seed(seed)
    model = MODELS.build(dict(model_cfg, lora_config=lora_config))
    model.init_weights()
    randomize_lora_b_(model, seed + 1, std=0.02)
    merge_lora(model.eval())
    normalization = InputNormalization.from_config(dict(
        type='SegDataPreProcessor', mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375],
        bgr_to_rgb=True))
    return ExportableEoMT(model, normalization, scores=scores)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the benchmark; returns the exit status."""
    args = parse_args(argv)
    import numpy as np
    import onnxruntime

    from eomt_mm.export import compare_with_onnxruntime, export_onnx
    from eomt_mm.utils.io import atomic_write_bytes
    torch.set_num_threads(args.threads)
    module = build_module(args.size, args.backbone, args.scores, args.seed)
    with tempfile.TemporaryDirectory() as work_dir:
        path = os.path.join(work_dir, 'eomt.onnx')
        export_onnx(module, path, (args.size, args.size))
        diffs = compare_with_onnxruntime(module, path, [(args.size, args.size)],
                                         batch=args.batch, threads=args.threads,
                                         seed=args.seed)[(args.size, args.size)]
        print('max |onnxruntime - torch| / max |torch|: ' +
              ', '.join(f'{name} {d:.1e}' for name, d in diffs.items()), flush=True)
        if max(diffs.values()) > TOLERANCE:
            print(f'onnx_speed: outputs differ by more than {TOLERANCE}', file=sys.stderr)
            return 1
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = args.threads
        options.inter_op_num_threads = 1
        options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
        session = onnxruntime.InferenceSession(path, options,
                                               providers=['CPUExecutionProvider'])
    gen = torch.Generator().manual_seed(args.seed)
    images = torch.randint(0, 256, (args.batch, 3, args.size, args.size), generator=gen,
                           dtype=torch.uint8)
    feed = {'images': np.ascontiguousarray(images.numpy())}
    fns = {BASELINE: lambda x: module(x), 'onnxruntime': lambda x: session.run(None, feed)}
    calls = time_variants(fns, images, args.repeats, args.steps, args.warmup,
                          log=lambda line: print(line, flush=True))
    rows = summarise(calls, args.batch, baseline=BASELINE)
    params = sum(p.numel() for p in module.parameters())
    header = (f'EoMT-B/16 ({args.backbone}) at {args.size}x{args.size}, batch {args.batch}, '
              f'{args.threads} thread(s), outputs {", ".join(module.output_names)}; '
              f'torch {torch.__version__}, onnxruntime {onnxruntime.__version__}; {cpu_name()}')
    print(report(rows, {name: params for name in rows}, header,
                 what={BASELINE: 'PyTorch eager (ExportableEoMT)',
                       'onnxruntime': 'onnxruntime CPU on the exported graph'}))
    if args.out:
        atomic_write_bytes(args.out, json.dumps(dict(header=header, diffs=diffs, rows=rows),
                                                indent=2).encode())
    return 0


if __name__ == '__main__':
    sys.exit(main())
