#!/usr/bin/env python
"""Make Cityscapes ``*_gtFine_labelTrainIds.png`` (19 train ids, 255 = ignore) for training.

mmseg's ``CityscapesDataset`` reads ``gtFine/<split>/<city>/*_gtFine_labelTrainIds.png``, which
the Cityscapes download does not contain: they are rendered from the polygon annotations
(``*_gtFine_polygons.json``) by cityscapesscripts' ``json2labelImg``, the function behind both
``csCreateTrainIdLabelImgs`` (single process) and mmseg's converter (shipped inside the wheel as
``mmseg/.mim/tools/dataset_converters/cityscapes.py``, not on PATH; it redoes every file, needs
the test split, and an interrupted run can leave truncated PNGs). This script runs it in
parallel, writes each file atomically, skips files already made and says what to fix when the
download or cityscapesscripts is missing.

Expected layout (the two official archives unzipped into one folder)::

    data/cityscapes/
        leftImg8bit/{train,val,test}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
        gtFine/{train,val,test}/<city>/<city>_<seq>_<frame>_gtFine_polygons.json

Usage::

    pip install cityscapesscripts
    python tools/prepare_cityscapes.py data/cityscapes --nproc 8
"""
from __future__ import annotations

import argparse
import os
import os.path as osp
import sys
import time
from multiprocessing import Pool
from pathlib import Path

# Running ``python tools/prepare_cityscapes.py`` puts tools/ on sys.path, not the repo root;
# make the checkout's package importable without an install.
_REPO_ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from eomt_mm.utils.io import atomic_write  # noqa: E402

POLYGON_SUFFIX = '_gtFine_polygons.json'
TRAIN_ID_SUFFIX = '_gtFine_labelTrainIds.png'
#: Number of finely annotated frames of the official splits, to flag an incomplete download.
EXPECTED_FRAMES = {'train': 2975, 'val': 500, 'test': 1525}

_DOWNLOAD_HINT = (
    'Download leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip from '
    'https://www.cityscapes-dataset.com/downloads/ (free account) and unzip both into the same '
    'folder, giving <root>/leftImg8bit/{train,val,test} and <root>/gtFine/{train,val,test}.')


class PrepareError(RuntimeError):
    """A problem the user has to fix (message says what and how)."""


def _load_converter():
    """cityscapesscripts' ``Annotation`` and ``createLabelImage`` (the two steps of its
    ``json2labelImg``)."""
    try:
        from cityscapesscripts.helpers.annotation import Annotation
        from cityscapesscripts.preparation.json2labelImg import createLabelImage
    except ImportError as err:
        raise PrepareError(
            'cityscapesscripts is required to render labelTrainIds from the polygon '
            f'annotations ({err}). Install it with: pip install cityscapesscripts') from err
    return Annotation, createLabelImage


def _convert_one(job: tuple[str, str]) -> str:
    json_path, out_path = job
    annotation_cls, create_label_image = _load_converter()

    def render(tmp: str) -> None:
        # json2labelImg's own steps, but naming the format: PIL otherwise picks it from the
        # extension, and the temporary file of atomic_write ends in .tmp.
        annotation = annotation_cls()
        annotation.fromJsonFile(json_path)
        create_label_image(annotation, 'trainIds').save(tmp, format='PNG')

    atomic_write(out_path, render)
    return out_path


def collect_jobs(root: Path, splits: list[str], overwrite: bool) -> tuple[list, dict]:
    """Polygon files to convert and the number of annotated frames found per split.

    Args:
        root: Cityscapes folder (holding ``leftImg8bit`` and ``gtFine``).
        splits: Splits to convert (sub-folders of ``gtFine``).
        overwrite: Also redo frames whose train-id PNG exists.

    Returns:
        ``(jobs, found)``: ``(json path, output path)`` pairs and frames found per split.

    Raises:
        PrepareError: A folder is missing or a split has no polygon annotation.
    """
    for sub in ('leftImg8bit', 'gtFine'):
        if not (root / sub).is_dir():
            raise PrepareError(f'{root / sub} does not exist. {_DOWNLOAD_HINT}')
    jobs, found = [], {}
    for split in splits:
        split_dir = root / 'gtFine' / split
        if not split_dir.is_dir():
            raise PrepareError(f'{split_dir} does not exist. {_DOWNLOAD_HINT}')
        polygons = sorted(split_dir.rglob(f'*{POLYGON_SUFFIX}'))
        if not polygons:
            raise PrepareError(f'no *{POLYGON_SUFFIX} under {split_dir}: is '
                               f'gtFine_trainvaltest.zip unzipped there? {_DOWNLOAD_HINT}')
        found[split] = len(polygons)
        for js in polygons:
            out = js.with_name(js.name[:-len(POLYGON_SUFFIX)] + TRAIN_ID_SUFFIX)
            if overwrite or not out.is_file():
                jobs.append((str(js), str(out)))
    return jobs, found


def prepare_cityscapes(root: str | os.PathLike, splits: tuple[str, ...] = ('train', 'val'),
                       nproc: int = 4, overwrite: bool = False, verbose: bool = True) -> dict:
    """Writes the ``labelTrainIds`` PNGs of the given splits.

    Args:
        root: Cityscapes folder.
        splits: Splits to convert.
        nproc: Worker processes.
        overwrite: Redo existing files.
        verbose: Print progress.

    Returns:
        ``{'converted': n, 'found': {split: frames}}``.

    Raises:
        PrepareError: Missing folders, annotations or cityscapesscripts.
    """
    root = Path(root)
    jobs, found = collect_jobs(root, list(splits), overwrite)
    _load_converter()  # fail before starting workers
    start = time.perf_counter()
    done = 0
    if jobs:
        with Pool(max(1, int(nproc))) as pool:
            for done, _ in enumerate(pool.imap_unordered(_convert_one, jobs, chunksize=8), 1):
                if verbose and (done % 200 == 0 or done == len(jobs)):
                    print(f'  {done}/{len(jobs)} label images written', flush=True)
    if verbose:
        print(f'{done} label images written in {time.perf_counter() - start:.0f} s '
              f'({sum(found.values()) - len(jobs)} already there)')
        for split, n in found.items():
            expected = EXPECTED_FRAMES.get(split)
            if expected is not None and n != expected:
                print(f'warning: gtFine/{split} has {n} annotated frames, the official split has '
                      f'{expected}: the download may be incomplete', file=sys.stderr)
    return dict(converted=done, found=found)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description='Render Cityscapes *_gtFine_labelTrainIds.png from the polygon annotations.')
    parser.add_argument('cityscapes_path', nargs='?', default='data/cityscapes',
                        help='folder with leftImg8bit/ and gtFine/ (default: data/cityscapes)')
    parser.add_argument('--splits', nargs='+', default=['train', 'val'],
                        help='splits to convert (default: train val; test has no public labels)')
    parser.add_argument('--nproc', type=int, default=min(8, os.cpu_count() or 1),
                        help='worker processes')
    parser.add_argument('--overwrite', action='store_true', help='redo existing label images')
    args = parser.parse_args(argv)
    try:
        prepare_cityscapes(args.cityscapes_path, tuple(args.splits), args.nproc, args.overwrite)
    except PrepareError as err:
        print(f'prepare_cityscapes: error: {err}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
