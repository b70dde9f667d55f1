#!/usr/bin/env python
"""Switching EoMT-B between two tasks: LoRA adapters vs full checkpoints.

Two tasks, A and B, are made from one random EoMT-B base: each has its own LoRA matrices
(the default LoRA: rank 8 on qkv / proj / fc1 / fc2) and its own trainable non-LoRA tensors
(decoder, norms), saved with ``save_adapter``; each is also saved as a full checkpoint of the
merged model (``merge_lora``: the plain EoMT-B state dict a fully fine-tuned model would have).
Switching A <-> B is timed, alternating the direction, for:

* ``set_adapter``: both adapters already loaded on the model (in memory);
* ``load_adapter``: read the other adapter from disk onto the loaded model (default
  ``check_base='warn'``: the base fingerprints are checked), and the same with
  ``check_base='ignore'`` (what the check costs);
* ``load full ckpt``: ``torch.load(weights_only=True)`` + ``load_state_dict`` of the other full
  checkpoint into an already built model;
* ``rebuild + full ckpt`` (the reference): build the model again and load the full checkpoint.

Each figure is the median of ``--repeats`` switches, the methods alternating within a round.
Before timing, the script checks that the model switched to B by ``set_adapter`` and by
``load_adapter`` gives the same outputs as the rebuilt model with B's full checkpoint.

    python tools/benchmark/adapter_swap.py [--repeats 7] [--size 640]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from bench_models import eomt_b_config  # noqa: E402
from bench_stats import cpu_name, format_table, human_bytes, median, ratio  # noqa: E402

import torch  # noqa: E402


def _build(size: int, lora: bool):
    from mmengine.registry import init_default_scope
    init_default_scope('mmseg')
    import eomt_mm  # noqa: F401
    from mmseg.registry import MODELS
    return MODELS.build(eomt_b_config(size, {} if lora else None)).eval()


def _make_task(model, seed: int) -> None:
    """Give every trainable tensor (LoRA, decoder, norms) task-specific random values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn(p.shape, generator=gen))


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, f))
               for root, _, files in os.walk(path) for f in files)


def run(args: argparse.Namespace) -> dict:
    from eomt_mm.lora.adapters import load_adapter, save_adapter, set_adapter
    from eomt_mm.lora.merge import merge_lora
    torch.manual_seed(args.seed)
    tmp = tempfile.mkdtemp(prefix='adapter_swap_')
    model = _build(args.size, lora=True)
    base_state = copy.deepcopy(model.state_dict())
    paths = {}
    for task, seed in (('a', 1), ('b', 2)):
        model.load_state_dict(base_state)
        _make_task(model, seed)
        adapter_dir = os.path.join(tmp, f'adapter_{task}')
        save_adapter(model, adapter_dir)
        merged = merge_lora(copy.deepcopy(model))
        full = os.path.join(tmp, f'full_{task}.pth')
        torch.save(merged.state_dict(), full)
        paths[task] = (adapter_dir, full)
        del merged
    model.load_state_dict(base_state)
    del base_state
    sizes = dict(adapter=_dir_bytes(paths['b'][0]), full=os.path.getsize(paths['b'][1]))

    probe = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))

    def outputs(m) -> torch.Tensor:
        with torch.no_grad():
            return m.eval().forward_logits(probe)[0]

    holder: Dict[str, object] = {}

    def rebuild(task: str) -> None:
        holder.pop('rebuilt', None)  # the previous model goes before the new one is built
        fresh = _build(args.size, lora=False)
        fresh.load_state_dict(torch.load(paths[task][1], weights_only=True))
        holder['rebuilt'] = fresh

    # Correctness first: every way of switching to B computes task B's merged model.
    rebuild('b')
    reference = outputs(holder['rebuilt'])
    load_adapter(model, paths['a'][0], adapter_name='a')
    load_adapter(model, paths['b'][0], adapter_name='b')
    checks = {}
    set_adapter(model, 'a')
    set_adapter(model, 'b')
    checks['set_adapter'] = float((outputs(model) - reference).abs().max())
    load_adapter(model, paths['a'][0], adapter_name='disk')
    load_adapter(model, paths['b'][0], adapter_name='disk')
    checks['load_adapter'] = float((outputs(model) - reference).abs().max())
    for name, diff in checks.items():
        if not diff <= args.atol:
            raise RuntimeError(f'{name}: switched model differs from task B by {diff:.3g} '
                               f'(> {args.atol}); the benchmark would time a wrong switch')

    plain = _build(args.size, lora=False)
    methods: Dict[str, Callable[[str], None]] = {
        'set_adapter': lambda task: set_adapter(model, task),
        'load_adapter': lambda task: load_adapter(model, paths[task][0], adapter_name='disk'),
        'load_adapter, no base check': lambda task: load_adapter(
            model, paths[task][0], adapter_name='disk', check_base='ignore'),
        'load full ckpt': lambda task: plain.load_state_dict(
            torch.load(paths[task][1], weights_only=True)),
        'rebuild + full ckpt': rebuild,
    }
    times: Dict[str, List[float]] = {name: [] for name in methods}
    names = list(methods)
    for rep in range(args.repeats):
        task = 'ab'[rep % 2]
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            start = time.perf_counter()
            methods[name](task)
            times[name].append(time.perf_counter() - start)
    medians = {name: median(t) for name, t in times.items()}
    ref = medians['rebuild + full ckpt']
    header = (f'EoMT-B task switch ({args.size} px model, median of {args.repeats}) | CPU: '
              f'{cpu_name()} | {os.cpu_count()} cores | torch {torch.__version__} | '
              f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    rows = [[name, f'{value * 1e3:.1f} ms', f'{ratio(value, ref):.4f}x',
             f'{ratio(ref, value):.1f}x faster' if value < ref else '-']
            for name, value in medians.items()]
    text = (header + '\n' + format_table(
        ['method', 'switch time', 'time / rebuild', 'speed-up'], rows)
        + f"\nadapter on disk {human_bytes(sizes['adapter'])}, full checkpoint "
        f"{human_bytes(sizes['full'])} ({ratio(sizes['adapter'], sizes['full']):.3f}x); "
        'max |output - task B reference|: '
        + ', '.join(f'{k} {v:.2e}' for k, v in checks.items()))
    print(text, flush=True)
    return dict(header=header, cpu=cpu_name(), args=vars(args), times=times, medians=medians,
                ratio_to_rebuild={k: ratio(v, ref) for k, v in medians.items()},
                sizes=sizes, checks=checks)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--size', type=int, default=640,
                        help='model input size (sets the pos-embed grid)')
    parser.add_argument('--repeats', type=int, default=7)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--atol', type=float, default=1e-4,
                        help='allowed output difference between switched and reference model')
    parser.add_argument('--out', help='write the results as JSON here')
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error('--repeats must be >= 1')
    if args.size <= 0 or args.size % 16:
        parser.error(f'--size must be a positive multiple of 16, got {args.size}')
    result = run(args)
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == '__main__':
    sys.exit(main())
