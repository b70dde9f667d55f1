"""Check that a config's data folders exist before a run starts.

Why this module exists: mmseg 1.2.2's ``BaseSegDataset.load_data_list``
lists ``data_root/data_prefix['img_path']`` with ``fileio.list_dir_or_file``;
for a folder that does not exist that is an ``os.scandir`` error deep inside
``Runner.build_dataloader`` (no hint what to do), and an existing but empty
folder gives an empty dataset that only fails later (an ``InfiniteSampler``
over nothing never yields a batch). The check runs in ``tools/train.py`` and
``tools/test.py`` on the config, before the ``Runner`` is built, so it works
for any mmseg dataset config (it only reads ``data_root``, ``data_prefix`` and
``ann_file``, walking wrappers such as ``ConcatDataset``/``RepeatDataset``) and
nothing is written to the work dir (earlier checkpoints stay untouched).

A config may set a top-level ``data_preparation`` string (the dataset base
configs in ``configs/_base_/datasets`` do) that says how to get its data; it
is quoted in the error. Without one the error points at the README.
"""
from __future__ import annotations

import copy
import os
import os.path as osp
from typing import Any, Iterator, List, Mapping, Sequence, Tuple

from mmengine.registry import DATASETS, DefaultScope

__all__ = ['check_data_folders', 'dataset_paths', 'check_label_files']

_MAX_LISTED = 10

_GENERIC_HINT = ('see the README section "Data preparation" (built-in demo: '
                 '`python tools/make_demo_data.py`; Cityscapes, ADE20K and '
                 'the anomaly benchmarks: download and lay them out as '
                 'described there)')


def _join(data_root: str, path: str) -> str:
    # BaseDataset._join_prefix: relative prefixes are taken under data_root.
    if not path or osp.isabs(path) or '://' in path:
        return path
    return osp.join(data_root, path) if data_root else path


def dataset_paths(dataset_cfg: Any) -> Iterator[Tuple[str, str]]:
    """Yield ``(what, path)`` for every local folder/file a dataset reads.

    Args:
        dataset_cfg: A dataset config dict; wrappers (``dataset=...`` or
            ``datasets=[...]``) are walked recursively.

    Yields:
        ``('data_root', path)``, ``('data_prefix.<key>', path)`` and
        ``('ann_file', path)`` tuples, paths joined the way mmengine's
        ``BaseDataset`` joins them. Remote (``scheme://``) paths are skipped.
    """
    if isinstance(dataset_cfg, (list, tuple)):
        for item in dataset_cfg:
            yield from dataset_paths(item)
        return
    if not isinstance(dataset_cfg, Mapping):
        return
    for key in ('dataset', 'datasets'):
        if key in dataset_cfg:
            yield from dataset_paths(dataset_cfg[key])
    data_root = dataset_cfg.get('data_root') or ''
    if '://' in str(data_root):
        return
    if data_root:
        yield 'data_root', str(data_root)
    prefix = dataset_cfg.get('data_prefix') or {}
    if isinstance(prefix, Mapping):
        for key, value in prefix.items():
            if isinstance(value, str) and value and '://' not in value:
                yield f'data_prefix.{key}', _join(str(data_root), value)
    ann_file = dataset_cfg.get('ann_file')
    if isinstance(ann_file, str) and ann_file and '://' not in ann_file:
        yield 'ann_file', _join(str(data_root), ann_file)


def _has_files(folder: str) -> bool:
    for _, _, files in os.walk(folder):
        if files:
            return True
    return False


def _shown(path: str) -> str:
    """``path`` quoted, with the absolute path it resolves to when it is relative."""
    expanded = osp.expanduser(path)
    if osp.isabs(expanded):
        return repr(path)
    return f'{path!r} (resolved to {osp.abspath(expanded)!r})'


def _relative_note(cfg: Mapping, relative: Sequence[str]) -> str:
    """Where relative paths were resolved, and where they do exist, if somewhere else.

    A relative ``data_root`` is taken from the working directory, not from the config's
    folder: run from another folder and the data seem missing although they are there.
    """
    if not relative:
        return ''
    note = (f'\nRelative paths are resolved from the working directory {os.getcwd()!r}.')
    config_file = getattr(cfg, 'filename', None)
    if config_file:
        # The config's folder and its parents (the repository root for configs/...).
        folder = osp.dirname(osp.abspath(config_file))
        while True:
            if all(osp.exists(osp.join(folder, p)) for p in relative):
                note += (f' They exist under {folder!r}: run from there, or give absolute '
                         'paths (e.g. data_root below).')
                break
            parent = osp.dirname(folder)
            if parent == folder:
                break
            folder = parent
    return note


def check_data_folders(cfg: Mapping,
                       dataloaders: Sequence[str] = ('train_dataloader',
                                                     'val_dataloader')
                       ) -> None:
    """Raise a clear error if a dataloader's data is missing.

    Args:
        cfg: The full config (``mmengine.Config`` or a dict).
        dataloaders: Names of the dataloader entries to check; entries that
            are absent or ``None`` are skipped (e.g. no validation).

    Raises:
        FileNotFoundError: If ``data_root``, a ``data_prefix`` folder or an
            ``ann_file`` does not exist, or an image/label folder holds no
            files. The message names the path, the dataloader and config key,
            and how to get the data.
    """
    hint = cfg.get('data_preparation') or _GENERIC_HINT
    problems: List[str] = []
    relative: List[str] = []
    for name in dataloaders:
        loader = cfg.get(name)
        if not isinstance(loader, Mapping) or 'dataset' not in loader:
            continue
        missing_roots: List[str] = []
        for what, path in dataset_paths(loader['dataset']):
            expanded = osp.expanduser(path)
            if any(expanded.startswith(root.rstrip(os.sep) + os.sep)
                   for root in missing_roots):
                continue  # inside a missing data_root: already reported
            if what == 'data_root' and not osp.isdir(expanded):
                missing_roots.append(expanded)
            missing = (not osp.isfile(expanded) if what == 'ann_file' else
                       not osp.isdir(expanded))
            if missing and not osp.isabs(expanded):
                relative.append(expanded)
            if what == 'ann_file':
                if missing:
                    problems.append(f'{name}.dataset.{what} {_shown(path)} does not '
                                    'exist')
            elif missing:
                problems.append(f'{name}.dataset.{what}: folder {_shown(path)} '
                                'does not exist')
            elif what != 'data_root' and not _has_files(expanded):
                problems.append(f'{name}.dataset.{what}: folder {path!r} is '
                                'empty')
    if problems:
        # De-duplicate (val and test loaders often share one dataset) but
        # keep the order in which they were found.
        unique = list(dict.fromkeys(problems))
        raise FileNotFoundError(
            'The data this config reads is missing:\n  - ' +
            '\n  - '.join(unique) + _relative_note(cfg, relative) +
            f'\nTo get the data: {hint}. If the data '
            'lives elsewhere, point the config at it, e.g. --cfg-options '
            'train_dataloader.dataset.data_root=DIR '
            'val_dataloader.dataset.data_root=DIR '
            'test_dataloader.dataset.data_root=DIR.')


def _without_pipelines(dataset_cfg: Any) -> Any:
    """A copy of a dataset config with every ``pipeline`` emptied.

    Listing the samples needs no transform, and some transforms do heavy work when built
    (``PasteOutliers`` reads the COCO annotation file).
    """
    if isinstance(dataset_cfg, Mapping):
        return type(dataset_cfg)({k: [] if k == 'pipeline' else _without_pipelines(v)
                                  for k, v in dataset_cfg.items()})
    if isinstance(dataset_cfg, (list, tuple)):
        return type(dataset_cfg)(_without_pipelines(v) for v in dataset_cfg)
    return copy.deepcopy(dataset_cfg)


def _data_infos(dataset: Any) -> Iterator[dict]:
    """Every sample's info of a built dataset, through ConcatDataset / RepeatDataset."""
    if hasattr(dataset, 'datasets'):
        for inner in dataset.datasets:
            yield from _data_infos(inner)
    elif hasattr(dataset, 'dataset') and not hasattr(dataset, 'data_list'):
        yield from _data_infos(dataset.dataset)
    elif hasattr(dataset, 'get_data_info'):
        for index in range(len(dataset)):
            yield dataset.get_data_info(index)


def check_label_files(cfg: Mapping,
                      dataloaders: Sequence[str] = ('train_dataloader', )) -> None:
    """Raise a clear error if an image of a dataloader's dataset has no label file.

    mmseg's ``BaseSegDataset`` derives each label path from its image path and never checks
    it, so a missing label surfaced as a bare file-system error when that image was first
    sampled, possibly hours into training. Here the datasets are built (mmseg's own
    listing, so any dataset class and ``ann_file`` work) and every ``seg_map_path`` is
    checked before the Runner exists and before anything is written.

    Args:
        cfg: The full config (``mmengine.Config`` or a dict); its ``default_scope``
            (default ``'mmseg'``) resolves the dataset types.
        dataloaders: Names of the dataloader entries to check; absent or ``None`` entries
            are skipped.

    Raises:
        FileNotFoundError: Naming the dataloader, how many labels are missing, and the
            first image / label pairs.
    """
    scope = cfg.get('default_scope') or 'mmseg'
    problems: List[str] = []
    for name in dataloaders:
        loader = cfg.get(name)
        if not isinstance(loader, Mapping) or 'dataset' not in loader:
            continue
        with DefaultScope.overwrite_default_scope(scope):
            dataset = DATASETS.build(_without_pipelines(loader['dataset']))
        total, missing = 0, []
        for info in _data_infos(dataset):
            total += 1
            label = info.get('seg_map_path')
            if isinstance(label, str) and '://' not in label and not osp.isfile(label):
                missing.append((info.get('img_path'), label))
        if missing:
            listed = '\n    '.join(f'image {img!r}: label {label!r} does not exist'
                                   for img, label in missing[:_MAX_LISTED])
            more = len(missing) - _MAX_LISTED
            problems.append(f'{name}: {len(missing)} of {total} images have no label file:'
                            f'\n    {listed}' + (f'\n    ... and {more} more'
                                                 if more > 0 else ''))
    if problems:
        raise FileNotFoundError(
            'Label files are missing (checked before training, nothing was written):\n  - ' +
            '\n  - '.join(problems) + '\nEvery image needs its label (the dataset\'s '
            'seg_map_suffix next to img_suffix): restore the missing files (render or prepare '
            'the data again), or remove those images.')
