#!/usr/bin/env python
"""What fills the peak of one EoMT-B training step: the live tensors at the peak, by op and shape.

The process's peak RSS (``train_step.py``) says how much; this says what. During one training
step (after a first step, so the optimizer state already exists) every tensor storage created by
an aten op is tracked until it is freed (a ``TorchDispatchMode`` with a weak reference on each
storage); storages that existed before the step (weights, buffers, optimizer state) are not
counted. At the peak of the live bytes the live set is recorded, and the largest groups (op that
made the tensor, shape) are printed with the live bytes after the forward pass and after the
backward pass. Allocator slack and fragmentation are not included: this is what a GPU's
``max_memory_allocated`` would count above the model and optimizer, not what RSS counts.

    python tools/benchmark/memory_breakdown.py --size 640 --variant lora
    python tools/benchmark/memory_breakdown.py --size 640 --variant lora_ckdec --top 10
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import weakref
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from bench_models import VARIANTS, build_eomt_b, random_batch  # noqa: E402
from bench_stats import cpu_name, format_table, human_bytes  # noqa: E402

Origin = Tuple[str, Tuple[int, ...]]


class LiveTensorTracker(TorchDispatchMode):
    """Live bytes of the CPU storages that aten ops create while the mode is active.

    Args:
        ignore: Tensors whose storages are never counted (they existed before: weights,
            buffers, optimizer state; views of them made by ops are not new memory).
    """

    def __init__(self, ignore: Sequence[torch.Tensor] = ()) -> None:
        super().__init__()
        self._ignored = {t.untyped_storage().data_ptr() for t in ignore if t.numel()}
        self._live: Dict[int, Tuple[int, Origin]] = {}
        self.current = 0
        self.peak = 0
        self.at_peak: List[Tuple[Origin, int]] = []
        self._peak_changed = False

    def _freed(self, key: int) -> None:
        entry = self._live.pop(key, None)
        if entry is not None:
            self.current -= entry[0]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor) or tensor.device.type != 'cpu':
                continue
            storage = tensor.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
            if size == 0 or key in self._ignored or key in self._live:
                continue
            self._live[key] = (size, (str(func.overloadpacket.__name__), tuple(tensor.shape)))
            self.current += size
            # The storage's Python object lives as long as the storage itself.
            weakref.finalize(storage, self._freed, key)
            if self.current > self.peak:
                self.peak = self.current
                self._peak_changed = True
        if self._peak_changed:
            # Snapshot once per op, after all of its outputs are counted.
            self._peak_changed = False
            self.at_peak = [(origin, size) for size, origin in self._live.values()]
        return out

    def largest_at_peak(self, top: int) -> List[Tuple[Origin, int, int]]:
        """``(origin, count, bytes)`` of the ``top`` largest groups live at the peak."""
        total: Dict[Origin, int] = collections.Counter()
        count: Dict[Origin, int] = collections.Counter()
        for origin, size in self.at_peak:
            total[origin] += size
            count[origin] += 1
        return [(origin, count[origin], size) for origin, size in total.most_common(top)]


def measure(size: int, variant: str, batch: int = 1, top: int = 15,
            backbone_arch: Optional[dict] = None) -> dict:
    """Track one training step of ``variant`` (after a first, untracked one).

    Args:
        size: Crop side (multiple of 16).
        variant: A key of ``bench_models.VARIANTS``.
        batch: Images per step.
        top: How many (op, shape) groups to return.
        backbone_arch: Narrow backbone for tests (see ``build_eomt_b``).

    Returns:
        ``peak``, ``after_forward``, ``after_backward`` (bytes) and ``largest``: the groups.
    """
    torch.manual_seed(0)
    model = build_eomt_b(size, variant, backbone_arch=backbone_arch)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    imgs, samples = random_batch(size, batch)

    def step(tracker: Optional[LiveTensorTracker] = None) -> Dict[str, int]:
        marks = {}
        optimizer.zero_grad(set_to_none=True)
        loss, _ = model.parse_losses(model.loss(imgs, samples))
        marks['after_forward'] = tracker.current if tracker else 0
        loss.backward()
        marks['after_backward'] = tracker.current if tracker else 0
        optimizer.step()
        return marks

    step()
    existing = list(model.state_dict(keep_vars=True).values()) + [imgs]
    existing += [v for state in optimizer.state.values() for v in state.values()
                 if isinstance(v, torch.Tensor)]
    tracker = LiveTensorTracker(ignore=existing)
    with tracker:
        marks = step(tracker)
    return dict(peak=tracker.peak, largest=tracker.largest_at_peak(top), **marks)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--size', type=int, default=640, help='crop side (multiple of 16)')
    parser.add_argument('--batch', type=int, default=1)
    parser.add_argument('--variant', default='lora', choices=list(VARIANTS))
    parser.add_argument('--top', type=int, default=15, help='groups to list')
    parser.add_argument('--threads', type=int, default=1)
    args = parser.parse_args(argv)
    if args.size <= 0 or args.size % 16:
        parser.error(f'--size must be a positive multiple of 16, got {args.size}')
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    result = measure(args.size, args.variant, args.batch, args.top)
    print(f'EoMT-B training step, {args.size}x{args.size}, batch {args.batch}, variant '
          f"{args.variant} ({VARIANTS[args.variant]['help']}) | CPU: {cpu_name()} | torch "
          f'{torch.__version__}')
    print(f"live tensors made by the step: peak {human_bytes(result['peak'])}, after forward "
          f"{human_bytes(result['after_forward'])}, after backward "
          f"{human_bytes(result['after_backward'])} (weights and optimizer state not counted)")
    rows = [[op, 'x'.join(map(str, shape)) or 'scalar', n, human_bytes(size),
             f"{100 * size / result['peak']:.1f}%"]
            for (op, shape), n, size in result['largest']]
    print(format_table(['op', 'shape', 'tensors', 'bytes at the peak', 'of the peak'], rows))
    return 0


if __name__ == '__main__':
    sys.exit(main())
