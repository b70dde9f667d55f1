"""Atomic file writes: the one helper every writer of this project uses.

A file written here is either its old complete version or its new complete version, never a
truncated mix: the data goes to a temporary file in the target folder (``os.replace`` is atomic
only within one file system), is flushed and ``fsync``-ed, and is renamed over the target; the
folder is then ``fsync``-ed so the rename itself survives a power loss.

The temporary name is ``.<name>.<pid>.<uuid>.tmp``: hidden, next to the target, and carrying the
writer's process id so that leftovers of a killed writer can be recognised (see
:func:`stale_temp_files`).
"""
from __future__ import annotations

import os
import os.path as osp
import re
import uuid
from typing import Callable, List, Union

__all__ = ['atomic_write', 'atomic_write_bytes', 'temp_name_for', 'stale_temp_files']

PathLike = Union[str, os.PathLike]

_TEMP_RE = re.compile(r'^\.(?P<name>.+)\.(?P<pid>\d+)\.(?P<uid>[0-9a-f]{32})\.tmp$')


def temp_name_for(path: PathLike) -> str:
    """The temporary path :func:`atomic_write` uses for ``path`` in this process.

    Args:
        path: Final path of the file.

    Returns:
        ``<folder>/.<name>.<pid>.<uuid>.tmp``.
    """
    path = osp.abspath(os.fspath(path))
    folder, name = osp.split(path)
    return osp.join(folder, f'.{name}.{os.getpid()}.{uuid.uuid4().hex}.tmp')


def _fsync_folder(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some file systems do not open folders; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: PathLike, write: Callable[[str], None]) -> None:
    """Write ``path`` atomically through ``write(temp_path)``.

    ``write`` receives a path (not a file object) because some writers only take paths
    (safetensors' ``save_file``); it must create that file. The parent folder is created if
    missing. On any error (or a KeyboardInterrupt) the temporary file is removed and the target
    is left as it was.

    Args:
        path: Final path of the file.
        write: Callable that writes the whole content to the path it is given.
    """
    path = osp.abspath(os.fspath(path))
    folder = osp.dirname(path)
    os.makedirs(folder, exist_ok=True)
    tmp = temp_name_for(path)
    try:
        write(tmp)
        # Flush the content to disk before the rename makes it visible under the final name.
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        if osp.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_folder(folder)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`).

    The file gets the permissions a plain ``open(path, 'wb')`` would give (``0o666`` minus the
    umask).

    Args:
        path: Final path of the file.
        data: The bytes to write.
    """

    def _write(tmp: str) -> None:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, 'wb') as f:
            f.write(data)

    atomic_write(path, _write)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def stale_temp_files(folder: PathLike) -> List[str]:
    """Temporary files of :func:`atomic_write` in ``folder`` whose writer process is gone.

    A writer killed between creating its temporary file and renaming it leaves the file behind
    (checkpoint-sized for a ViT-L); nothing else ever reads it.

    Args:
        folder: Folder to scan (not recursive). A missing folder has none.

    Returns:
        Sorted paths of the leftovers of dead writers.
    """
    folder = os.fspath(folder)
    if not osp.isdir(folder):
        return []
    out = []
    for entry in os.listdir(folder):
        match = _TEMP_RE.match(entry)
        if match and not _pid_alive(int(match.group('pid'))):
            out.append(osp.join(folder, entry))
    return sorted(out)
