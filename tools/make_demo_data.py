#!/usr/bin/env python
"""Generate the built-in demo data set (synthetic road scenes, Cityscapes layout).

Usage::

    python tools/make_demo_data.py                   # writes data/demo (a few seconds)
    python tools/make_demo_data.py --out /tmp/demo --num-train 96 --seed 1

Running it again with the same arguments does nothing (the manifest is checked), so it is safe
to put in front of every demo command.
"""
from __future__ import annotations

import argparse
import os
import sys

# The renderer is the package tools/demo_data, not part of eomt_mm: it needs only numpy and
# OpenCV (importing eomt_mm would cost seconds of torch, mmseg and mmpretrain start-up for
# nothing). ``python tools/make_demo_data.py`` puts tools/ on sys.path already; this line covers
# loading the script from elsewhere (e.g. by its path).
_TOOLS = os.path.dirname(os.path.abspath(__file__))
if _TOOLS not in sys.path:
    sys.path.append(_TOOLS)

from demo_data import generate_demo_dataset  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--out', default='data/demo', help='output folder (default: data/demo)')
    parser.add_argument('--num-train', type=int, default=48, help='training images (48)')
    parser.add_argument('--num-val', type=int, default=12, help='validation images (12)')
    parser.add_argument('--num-anomaly', type=int, default=12,
                        help='images of the anomaly split (12; 0 omits it)')
    parser.add_argument('--height', type=int, default=128, help='image height (128)')
    parser.add_argument('--width', type=int, default=256, help='image width (256)')
    parser.add_argument('--seed', type=int, default=0, help='base random seed (0)')
    parser.add_argument('--force', action='store_true',
                        help='regenerate even if an up-to-date data set exists')
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        info = generate_demo_dataset(
            args.out, num_train=args.num_train, num_val=args.num_val,
            num_anomaly=args.num_anomaly, height=args.height, width=args.width, seed=args.seed,
            force=args.force)
    except (ValueError, FileExistsError) as err:
        print(f'make_demo_data: error: {err}', file=sys.stderr)
        return 2
    state = 'generated' if info.generated else 'already up to date'
    print(f'demo data {state}: {info.root} ({info.num_train} train, {info.num_val} val, '
          f'{info.num_anomaly} anomaly images of {args.height}x{args.width}; '
          f'{info.seconds:.1f} s; digest {info.digest[:12]})')
    print(f'  images: {info.root}/leftImg8bit/{{train,val}}/<city>/*_leftImg8bit.png')
    print(f'  labels: {info.root}/gtFine/{{train,val}}/<city>/*_gtFine_labelTrainIds.png')
    if info.num_anomaly:
        print(f'  anomaly split: {info.root}/anomaly/{{images,labels_masks}}/*.png')
    return 0


if __name__ == '__main__':
    sys.exit(main())
