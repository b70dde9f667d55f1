#!/usr/bin/env python
"""Benchmark one LoRA layer: ours vs PEFT's ``lora.Linear`` vs plain ``nn.Linear``.

Measured on ViT-B / ViT-L shapes (1,600 tokens = a 640 x 640 image in 16-pixel patches,
``d`` = 768 / 1024, rank 8 / 16) for the ViT linear layers named by ``--layers`` (``proj``
``d -> d`` by default; ``qkv`` ``d -> 3d``, ``fc1`` ``d -> 4d``, ``fc2`` ``4d -> d``), all
variants in one process, rotating their order every repeat, each number the median of
``--repeats`` timings of ``--inner`` calls:

* ``train``: forward + backward with the base weight frozen and the input requiring
  grad (as inside a network), LoRA matrices trainable, each of ``--dropouts``; reference
  ``linear`` = the frozen ``nn.Linear`` alone, i.e. what the base layer costs without
  any adapter;
* ``merged``: inference (eval, no grad) of the merged layer vs ``nn.Linear``;
* ``unmerged``: inference with the adapter branch.

It also reports the activation memory one layer keeps for backward (training mode,
dropout 0 and each of ``--dropouts``): the unique storages handed to autograd's saved-tensor hooks, not
counting the layer's own parameters, and the part of it beyond the layer input (which may
or may not be kept alive by other layers). A last table sums up each dropout > 0 row:
training time and activation memory (totals), ours / PEFT.

    python tools/benchmark/lora_layer.py            # full table
    python tools/benchmark/lora_layer.py --quick    # smoke run (seconds)
    python tools/benchmark/lora_layer.py --threads 1 --clock cpu \
        --layers proj qkv fc1 fc2 --dropouts 0.1    # dropout rows of every layer
"""
from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Sequence, Tuple

import torch
import torch.nn as nn

from eomt_mm.lora.layer import LoRALinear

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_stats import cpu_name  # noqa: E402

ARCH_DIMS = {'ViT-B': 768, 'ViT-L': 1024}
# Output width of each ViT linear layer as a multiple of d (input width is d, or 4d
# for fc2).
LAYER_SHAPES = {'proj': (1, 1), 'qkv': (1, 3), 'fc1': (1, 4), 'fc2': (4, 1)}


def _peft_linear(base: nn.Linear, rank: int, alpha: float, dropout: float) -> nn.Module:
    from peft import LoraConfig
    from peft.tuners.lora import Linear as PeftLoraLinear
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout)
    layer = PeftLoraLinear(base, 'default', config=config, r=rank, lora_alpha=alpha)
    # PEFT initialises lora_B to zero; any values do for timing, and equal outputs are
    # checked below with non-zero B.
    return layer


def build_variants(d_in: int, d_out: int, rank: int, alpha: float, dropout: float,
                   device: torch.device) -> Dict[str, nn.Module]:
    """Same base weights in every variant; LoRA matrices copied from ours into PEFT's."""
    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out).to(device)
    ours = LoRALinear.from_linear(base, rank=rank, alpha=alpha, dropout=dropout)
    with torch.no_grad():
        ours.lora_B.normal_(std=0.02)
    variants: Dict[str, nn.Module] = {'linear': base, 'ours': ours}
    try:
        peft_base = nn.Linear(d_in, d_out).to(device)
        peft_base.load_state_dict(base.state_dict())
        peft = _peft_linear(peft_base, rank, alpha, dropout)
        with torch.no_grad():
            peft.lora_A['default'].weight.copy_(ours.lora_A)
            peft.lora_B['default'].weight.copy_(ours.lora_B)
        variants['peft'] = peft
    except ImportError:
        pass
    for m in variants.values():
        for name, p in m.named_parameters():
            p.requires_grad_('lora_' in name)
    return variants


def check_equal_outputs(variants: Dict[str, nn.Module], x: torch.Tensor) -> float:
    """Max |ours - peft| in eval mode (the two compute the same function)."""
    if 'peft' not in variants:
        return float('nan')
    with torch.no_grad():
        variants['ours'].eval()
        variants['peft'].eval()
        diff = (variants['ours'](x) - variants['peft'](x)).abs().max().item()
    return diff


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def train_step(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> None:
    for p in layer.parameters():
        p.grad = None
    x.grad = None
    layer(x).backward(grad)


def time_calls(fn: Callable[[], None], inner: int, device: torch.device,
               clock: Callable[[], float] = time.perf_counter) -> float:
    _sync(device)
    t0 = clock()
    for _ in range(inner):
        fn()
    _sync(device)
    return (clock() - t0) / inner


def set_merged(layer: nn.Module, merged: bool) -> None:
    if isinstance(layer, LoRALinear):
        layer.merge() if merged else layer.unmerge()
    elif hasattr(layer, 'merge'):  # PEFT
        if merged and not layer.merged:
            layer.merge()
        elif not merged and layer.merged:
            layer.unmerge()


def saved_activation_bytes(layer: nn.Module, x: torch.Tensor) -> Tuple[int, int]:
    """(unique saved bytes excluding parameters, the part not sharing x's storage)."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    storages: Dict[int, int] = {}

    def pack(t: torch.Tensor):
        s = t.untyped_storage()
        if s.data_ptr() not in param_ptrs:
            storages[s.data_ptr()] = s.nbytes()
        return t

    layer.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(x)
    del out
    x_ptr = x.untyped_storage().data_ptr()
    total = sum(storages.values())
    beyond = sum(n for p, n in storages.items() if p != x_ptr)
    return total, beyond


def run(args: argparse.Namespace) -> str:
    device = torch.device(args.device)
    lines: List[str] = []

    def emit(line: str) -> None:
        # Printed as produced: the timed section takes minutes.
        lines.append(line)
        print(line, flush=True)

    peft_version = 'not installed'
    try:
        import peft
        peft_version = peft.__version__
    except ImportError:
        pass
    emit(f'CPU: {cpu_name()} | threads: {torch.get_num_threads()} | torch {torch.__version__}'
         f' | peft {peft_version} | device {device} | clock {args.clock}'
         + (f' ({torch.cuda.get_device_name(device)})' if device.type == 'cuda' else ''))
    shapes = ', '.join(f'{layer} {LAYER_SHAPES[layer][0]}d x {LAYER_SHAPES[layer][1]}d'
                       for layer in args.layers)
    emit(f'tokens {args.tokens}, layers (in x out): {shapes}, alpha = 2 r, '
         f'median of {args.repeats} repeats x {args.inner} calls, fp32')
    emit('')

    configs = list(itertools.product(args.layers, args.archs, args.ranks))
    # (layer, arch, rank, dropout) -> name -> list of seconds
    timings: Dict[Tuple, Dict[str, List[float]]] = {}
    setups = {}
    for layer_name, arch, rank in configs:
        d_in, d_out = _layer_dims(layer_name, arch)
        for p in args.dropouts:
            variants = build_variants(d_in, d_out, rank, 2.0 * rank, p, device)
            x = torch.randn(1, args.tokens, d_in, device=device)
            diff = check_equal_outputs(variants, x)
            if diff == diff and diff > 1e-4:
                raise RuntimeError(f'ours and PEFT disagree ({diff:.2e}) at {layer_name} '
                                   f'{arch} r{rank}')
            key = (layer_name, arch, rank, p)
            setups[key] = (variants, x.requires_grad_(True),
                           torch.randn(1, args.tokens, d_out, device=device))
            timings[key] = {}

    def jobs(key) -> List[Tuple[str, Callable[[], None], Callable[[], None]]]:
        variants, x, g = setups[key]
        dropout = key[3]
        out = []
        for name, layer in variants.items():
            def prep_train(layer=layer):
                set_merged(layer, False)
                layer.train()

            def prep_eval(layer=layer, merged=True):
                set_merged(layer, merged)
                layer.eval()

            if dropout == 0.0 or name != 'linear':  # the plain layer has no dropout
                out.append((f'train/{name}', prep_train,
                            lambda layer=layer: train_step(layer, x, g)))
            if dropout == 0.0:
                xi = x.detach()
                if name != 'linear':
                    out.append((f'unmerged/{name}', lambda layer=layer: prep_eval(layer, False),
                                lambda layer=layer: _infer(layer, xi)))
                out.append((f'merged/{name}', prep_eval, lambda layer=layer: _infer(layer, xi)))
        return out

    all_jobs = {key: jobs(key) for key in setups}
    # 'cpu' clock = CPU time of the calling thread: with --threads 1 every op runs on
    # it, so the numbers stay meaningful on a machine shared with other processes
    # (wall time there mostly measures the scheduler).
    clock = time.thread_time if args.clock == 'cpu' else time.perf_counter
    # Warm-up: every job once (allocator, oneDNN primitive caches).
    for key, js in all_jobs.items():
        for name, prep, fn in js:
            prep()
            fn()
    t_start = time.perf_counter()
    for rep in range(args.repeats):
        for key, js in all_jobs.items():
            # Rotate the order each repeat so no variant always runs first / last.
            k = rep % len(js)
            for name, prep, fn in js[k:] + js[:k]:
                prep()
                timings[key].setdefault(name, []).append(
                    time_calls(fn, args.inner, device, clock))
    elapsed = time.perf_counter() - t_start

    def med(key, name) -> float:
        return statistics.median(timings[key][name]) * 1e3 if name in timings[key] else float('nan')

    has_peft = 'peft' in setups[next(iter(setups))][0]
    emit('| shape | r | dropout | train ms: ours / PEFT / linear | ours/PEFT | ours/linear '
         '| unmerged infer ms: ours / PEFT | merged infer ms: ours / linear | merged ours/linear |')
    emit('|---|---|---|---|---|---|---|---|---|')
    for key in setups:
        layer_name, arch, rank, p = key
        tr = [med(key, f'train/{n}') for n in ('ours', 'peft', 'linear')]
        row = (f'| {arch} {layer_name} d={ARCH_DIMS[arch]} | {rank} | {p:g} | '
               f'{tr[0]:.2f} / {tr[1]:.2f} / {tr[2]:.2f} | {tr[0] / tr[1]:.3f} | '
               f'{tr[0] / tr[2]:.3f} | ').replace(' / nan |', ' / - |').replace('| nan |', '| - |')
        if p == 0.0:
            um = [med(key, f'unmerged/{n}') for n in ('ours', 'peft')]
            mg = [med(key, f'merged/{n}') for n in ('ours', 'linear')]
            row += (f'{um[0]:.2f} / {um[1]:.2f} | {mg[0]:.2f} / {mg[1]:.2f} | '
                    f'{mg[0] / mg[1]:.3f} |')
        else:
            row += '- | - | - |'
        emit(row)
    if not has_peft:
        emit('(peft is not installed: PEFT columns are nan)')
    emit(f'(timed section: {elapsed:.0f} s)')
    emit('')

    emit('Activation memory kept for backward by one layer (MB; excluding its parameters; '
         '"beyond input" = not sharing the layer input\'s storage):')
    emit('| shape | r | dropout | ours: total / beyond input | PEFT: total / beyond input '
         '| nn.Linear (frozen): total / beyond input | total ours/PEFT |')
    emit('|---|---|---|---|---|---|---|')
    mb = 1.0 / 2**20
    memory: Dict[Tuple, Dict[str, int]] = {}
    for layer_name, arch, rank in configs:
        d_in, d_out = _layer_dims(layer_name, arch)
        for p in sorted({0.0, *args.dropouts}):
            variants = build_variants(d_in, d_out, rank, 2.0 * rank, p, device)
            x = torch.randn(1, args.tokens, d_in, device=device, requires_grad=True)
            cells, totals = [], {}
            for n in ('ours', 'peft', 'linear'):
                if n not in variants:
                    cells.append('n/a')
                    continue
                total, beyond = saved_activation_bytes(variants[n], x)
                totals[n] = total
                cells.append(f'{total * mb:.2f} / {beyond * mb:.2f}')
            memory[(layer_name, arch, rank, p)] = totals
            mem_ratio = (f'{totals["ours"] / totals["peft"]:.3f}' if 'peft' in totals else '-')
            emit(f'| {arch} {layer_name} d={ARCH_DIMS[arch]} | {rank} | {p:g} | '
                 + ' | '.join(cells) + f' | {mem_ratio} |')

    dropout_keys = [key for key in setups if key[3] > 0.0]
    if dropout_keys and has_peft:
        emit('')
        emit('Training with dropout, ours / PEFT (time: medians above; memory: totals above):')
        emit('| shape | layer | r | dropout | train ms: ours / PEFT | time ours/PEFT '
             '| activation MB: ours / PEFT | memory ours/PEFT |')
        emit('|---|---|---|---|---|---|---|---|')
        for key in dropout_keys:
            layer_name, arch, rank, p = key
            t_ours, t_peft = med(key, 'train/ours'), med(key, 'train/peft')
            mem = memory.get(key)
            mem_cells = (f'{mem["ours"] * mb:.2f} / {mem["peft"] * mb:.2f} | '
                         f'{mem["ours"] / mem["peft"]:.3f}' if mem else '- | -')
            emit(f'| {arch} d={ARCH_DIMS[arch]} | {layer_name} | {rank} | {p:g} | '
                 f'{t_ours:.2f} / {t_peft:.2f} | {t_ours / t_peft:.3f} | {mem_cells} |')
    return '\n'.join(lines)


def _layer_dims(layer_name: str, arch: str) -> Tuple[int, int]:
    d = ARCH_DIMS[arch]
    return d * LAYER_SHAPES[layer_name][0], d * LAYER_SHAPES[layer_name][1]


def _infer(layer: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        layer(x)


def main(argv: Sequence[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--quick', action='store_true',
                        help='ViT-B only, rank 8, 3 repeats of 2 calls (a smoke run)')
    parser.add_argument('--archs', nargs='+', default=list(ARCH_DIMS), choices=list(ARCH_DIMS))
    parser.add_argument('--ranks', nargs='+', type=int, default=[8, 16])
    parser.add_argument('--layers', nargs='+', default=['proj'], choices=list(LAYER_SHAPES),
                        help='ViT linear layers to measure (default: proj)')
    parser.add_argument('--tokens', type=int, default=1600)
    parser.add_argument('--repeats', type=int, default=11)
    parser.add_argument('--inner', type=int, default=3)
    parser.add_argument('--dropouts', nargs='+', type=float, default=[0.0, 0.1],
                        help='dropout probabilities to time training with (default: 0 0.1; '
                        'inference is timed with the dropout-0 layers only)')
    parser.add_argument('--clock', default='wall', choices=['wall', 'cpu'],
                        help="'cpu': thread CPU time, for busy machines (use with "
                        '--threads 1); default wall-clock')
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--threads', type=int, default=None,
                        help='torch.set_num_threads (default: torch\'s choice)')
    args = parser.parse_args(argv)
    if not all(0.0 <= p < 1.0 for p in args.dropouts):
        parser.error(f'--dropouts must be in [0, 1), got {args.dropouts}')
    if args.quick:
        args.archs, args.ranks, args.repeats, args.inner = ['ViT-B'], [8], 3, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == 'cpu' and (torch.get_num_threads() != 1 or args.device != 'cpu'):
        parser.error('--clock cpu measures one thread: use it with --threads 1 on cpu')
    run(args)
    return 0


if __name__ == '__main__':
    sys.exit(main())
