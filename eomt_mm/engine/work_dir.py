"""The work dir when a training run starts or resumes: leftovers and the checkpoint to resume.

* A writer killed while saving (SIGKILL, power loss) leaves the temporary file of
  :func:`eomt_mm.utils.io.atomic_write` behind (``.iter_N.pth.<pid>.<uuid>.tmp``,
  checkpoint-sized); nothing reads it, so :func:`remove_stale_temp_files` removes those of
  dead writers when a run starts and logs each one.
* mmengine resumes from the file ``last_checkpoint`` names and stops when that file is
  missing or truncated, although an older intact checkpoint may be next to it;
  :func:`checkpoint_behind_broken_record` picks the newest intact one instead.
"""
from __future__ import annotations

import logging
import os
import os.path as osp
import re
import zipfile
from typing import Iterable, List, Optional, Tuple

from mmengine.logging import print_log

from eomt_mm.utils.io import stale_temp_files

__all__ = ['remove_stale_temp_files', 'checkpoint_folders', 'is_truncated_checkpoint',
           'checkpoint_behind_broken_record']

_CHECKPOINT_RE = re.compile(r'(iter|epoch)_(\d+)\.pth')


def checkpoint_folders(work_dir: str, checkpoint_out_dir: Optional[str] = None) -> List[str]:
    """The folders a run writes checkpoints and ``last_checkpoint`` to.

    Args:
        work_dir: The run's work dir.
        checkpoint_out_dir: ``default_hooks.checkpoint.out_dir``, if set; mmengine's
            ``CheckpointHook`` then writes to ``out_dir/<basename of work_dir>``.

    Returns:
        The folders, without duplicates.
    """
    folders = [osp.abspath(work_dir)]
    if checkpoint_out_dir and '://' not in checkpoint_out_dir:
        folders.append(osp.abspath(osp.join(checkpoint_out_dir,
                                            osp.basename(osp.normpath(work_dir)))))
    return list(dict.fromkeys(folders))


def remove_stale_temp_files(folders: Iterable[str], logger: str = 'current') -> List[str]:
    """Remove the temporary files of dead writers (:func:`stale_temp_files`), logging each.

    Only files named like :func:`eomt_mm.utils.io.atomic_write`'s temporaries whose writer
    process no longer exists are removed; every finished file is left alone.

    Args:
        folders: Folders to clean (not recursive).
        logger: mmengine logger name to report to.

    Returns:
        The removed paths.
    """
    removed = []
    for folder in folders:
        for path in stale_temp_files(folder):
            try:
                size = osp.getsize(path)
                os.remove(path)
            except FileNotFoundError:  # another process (rank) removed it first
                continue
            removed.append(path)
            print_log(f'removed {path} ({size:,} bytes): the temporary file of a writer '
                      'that was killed while saving; the finished files are untouched',
                      logger=logger, level=logging.WARNING)
    return removed


def is_truncated_checkpoint(path: str) -> bool:
    """Whether ``path`` is a torch checkpoint cut short: empty, or a zip archive without its end.

    ``torch.save`` writes a zip archive whose central directory comes last, so a truncated
    copy starts like an archive but cannot be opened; checking costs a few kilobytes of
    reading, no tensor is loaded. Files of another kind are not "truncated" (loading them
    names their problem).

    Args:
        path: A checkpoint file.

    Returns:
        True for an empty file or an archive that does not open or lacks ``data.pkl``.
    """
    try:
        if osp.getsize(path) == 0:
            return True
        with open(path, 'rb') as f:
            if f.read(4) != b'PK\x03\x04':
                return False
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile, ValueError):
        return True
    return not any(n == 'data.pkl' or n.endswith('/data.pkl') for n in names)


def _checkpoints(work_dir: str) -> List[Tuple[int, str]]:
    found = []
    for name in os.listdir(work_dir):
        match = _CHECKPOINT_RE.fullmatch(name)
        if match:
            found.append((int(match.group(2)), osp.join(work_dir, name)))
    return sorted(found, reverse=True)


def checkpoint_behind_broken_record(work_dir: str) -> Optional[str]:
    """The checkpoint to resume from when ``work_dir/last_checkpoint`` is unusable.

    mmengine resumes from the path recorded in ``last_checkpoint``. A record left empty by a
    run killed while writing it (mmengine before this project made that write atomic), naming
    a deleted file, or naming a truncated file (:func:`is_truncated_checkpoint`) stops
    ``--resume``. Then the newest intact ``iter_*.pth`` / ``epoch_*.pth`` of the work dir is
    used instead, with a warning; the truncated file is left as it is.

    Args:
        work_dir: The run's work dir.

    Returns:
        None when the record is absent (mmengine starts from scratch) or usable; else the
        checkpoint to resume from.

    Raises:
        FileNotFoundError: If the record is unusable and the work dir holds no other intact
            checkpoint.
    """
    record = osp.join(work_dir, 'last_checkpoint')
    if not osp.isfile(record):
        return None
    with open(record) as f:
        recorded = f.read().strip()
    if recorded and osp.isfile(recorded):
        if not is_truncated_checkpoint(recorded):
            return None
        problem = (f'names {recorded!r}, which is truncated ({osp.getsize(recorded):,} '
                   'bytes; left as it is)')
    elif recorded:
        problem = f'names {recorded!r}, which does not exist'
    else:
        problem = 'is empty'
    found = [(n, p) for n, p in _checkpoints(work_dir)
             if osp.abspath(p) != osp.abspath(recorded or '')]
    intact = [p for _, p in found if not is_truncated_checkpoint(p)]
    if not intact:
        raise FileNotFoundError(
            f'--resume: {record} {problem} and {work_dir} holds no iter_*.pth / epoch_*.pth '
            'checkpoint to fall back to (none, or only truncated ones); pass --resume PATH, '
            'or remove that record to start from scratch.')
    newest = intact[0]
    print_log(f'--resume: {record} {problem}; resuming from the newest intact checkpoint in '
              f'the work dir, {newest}',
              logger='current', level=logging.WARNING)
    return newest
