"""A temporary folder of append-only array files, for evaluation state that must not live in RAM.

``AnomalyMetric`` spills every frame's sorted score runs and score maps here so that its resident
memory does not grow with the dataset (:mod:`.exact_store`). Each array goes to the end of one file
per kind (``<kind>.bin``, one dtype per file) and is addressed by a :class:`Segment` (path, dtype,
element offset, length): a few bytes per frame stay in memory, the data stays on disk.

Reading uses ``os.pread`` into ordinary memory instead of ``np.memmap``: pages of a memory map count
as resident (they would make the memory bound unmeasurable), while ``pread`` copies exactly the
slice asked for and the page cache stays the kernel's business. Writes go straight to the
descriptor (no Python buffering), so a segment is readable by any process on the machine as soon
as :meth:`SpillFolder.append` returns.

The folder is removed by :meth:`SpillFolder.close`, when the object is garbage-collected, and at
interpreter exit (``weakref.finalize``), so an evaluation that fails half-way leaves nothing behind.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import weakref
from typing import Dict, Optional

import numpy as np

__all__ = ['Segment', 'SpillFolder', 'read_segment']


@dataclasses.dataclass(frozen=True)
class Segment:
    """One spilled 1-D array.

    Attributes:
        path: the file holding it.
        dtype: numpy dtype name of the file's elements.
        offset: index of the first element in the file.
        length: number of elements.
    """

    path: str
    dtype: str
    offset: int
    length: int


def read_segment(segment: Segment, start: int = 0, stop: Optional[int] = None) -> np.ndarray:
    """Elements ``[start, stop)`` of a spilled array, read into a new writable array.

    Args:
        segment: where the array lies.
        start: first element (relative to the segment).
        stop: end element (default: the segment's end).

    Returns:
        1-D array of ``segment.dtype``.

    Raises:
        FileNotFoundError: the spill folder was removed (the evaluation it belonged to ended).
    """
    stop = segment.length if stop is None else stop
    dtype = np.dtype(segment.dtype)
    count = max(stop - start, 0)
    out = np.empty(count, dtype=dtype)
    if not count:
        return out
    try:
        fd = os.open(segment.path, os.O_RDONLY)
    except FileNotFoundError:
        raise FileNotFoundError(
            f'spilled evaluation data {segment.path} is gone: its AnomalyMetric was evaluated '
            '(or closed) already; results can be computed once per evaluation') from None
    try:
        view = memoryview(out).cast('B')
        done, base = 0, (segment.offset + start) * dtype.itemsize
        while done < view.nbytes:
            got = os.preadv(fd, [view[done:]], base + done)
            if got <= 0:
                raise OSError(f'{segment.path} is shorter than its segment {segment}')
            done += got
    finally:
        os.close(fd)
    return out


def _remove(path: str, descriptors: Dict[str, int]) -> None:
    for fd in descriptors.values():
        try:
            os.close(fd)
        except OSError:
            pass
    descriptors.clear()
    shutil.rmtree(path, ignore_errors=True)


class SpillFolder:
    """Append-only array files in a private temporary folder, created on first use.

    Args:
        parent: folder in which the temporary folder is made (default: the system's temporary
            folder, ``tempfile.gettempdir()``). Point it at a disk with room for the dataset's
            scores when the default one is small.
    """

    def __init__(self, parent: Optional[str] = None) -> None:
        if parent is not None and not os.path.isdir(parent):
            raise FileNotFoundError(f'spill folder parent {parent!r} does not exist; create it '
                                    'or pass spill_dir=None for the system temporary folder')
        self.parent = parent
        self.path: Optional[str] = None
        self._fds: Dict[str, int] = {}
        self._sizes: Dict[str, int] = {}
        self._finalizer: Optional[weakref.finalize] = None

    def append(self, kind: str, array: np.ndarray) -> Segment:
        """Writes ``array`` (flattened) at the end of ``<kind>.bin``.

        Args:
            kind: file name stem; each kind holds one dtype.
            array: data to spill.

        Returns:
            The :class:`Segment` addressing it.

        Raises:
            TypeError: a kind receives a second dtype.
            OSError: the disk is full (the message names the folder and the fix).
        """
        array = np.ascontiguousarray(array).reshape(-1)
        if self.path is None:
            self.path = tempfile.mkdtemp(prefix='anomaly_metric_', dir=self.parent)
            self._finalizer = weakref.finalize(self, _remove, self.path, self._fds)
        name = f'{kind}.{array.dtype.name}'
        path = os.path.join(self.path, name + '.bin')
        if name not in self._fds:
            self._fds[name] = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            self._sizes[name] = 0
        offset = self._sizes[name]
        view = memoryview(array).cast('B')
        try:
            done = 0
            while done < view.nbytes:
                done += os.write(self._fds[name], view[done:])
        except OSError as err:
            raise OSError(err.errno, f'cannot spill evaluation data to {self.path} ({err}); '
                          'free space there or set AnomalyMetric(spill_dir=...) to a folder on a '
                          'larger disk') from None
        self._sizes[name] = offset + array.size
        return Segment(path, array.dtype.name, offset, array.size)

    @property
    def nbytes(self) -> int:
        """Bytes spilled so far."""
        return sum(size * np.dtype(name.rsplit('.', 1)[1]).itemsize
                   for name, size in self._sizes.items())

    def close(self) -> None:
        """Removes the folder and everything in it (idempotent); the next append makes a new one."""
        if self._finalizer is not None:
            self._finalizer()
        self.path, self._finalizer = None, None
        self._fds = {}
        self._sizes = {}
