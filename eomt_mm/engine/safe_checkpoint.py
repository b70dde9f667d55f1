"""Safe checkpointing for mmengine: one explicit, idempotent, version-checked installation.

``import eomt_mm`` changes nothing in mmengine. :func:`install_safe_checkpointing` (called by
this project's tools, or by importing :mod:`eomt_mm.engine.safe_checkpoint_install`, which
``configs/_base_/default_runtime.py`` lists in ``custom_imports`` for mmseg's own tools) changes
three things, process-wide:

1. **Checkpoint loading** (``mmengine.runner.CheckpointLoader``, mmengine/runner/checkpoint.py):
   the local-path scheme (prefix ``''``, mmengine's ``load_from_local``, a bare
   ``torch.load(filename)``) is re-registered as
   :func:`~eomt_mm.engine.checkpoint.load_from_local_weights_only`:
   ``torch.load(weights_only=True)`` with exactly the non-tensor types mmengine itself writes
   allow-listed for the duration of the call (see :mod:`eomt_mm.engine.checkpoint`), so
   ``load_from``, ``resume`` and ``init_cfg=dict(type='Pretrained')`` load mmengine checkpoints
   under torch >= 2.6 and refuse any other pickled object with
   :class:`~eomt_mm.engine.checkpoint.UnsafeCheckpointError`. Every other registered scheme
   (http, s3, ...) is wrapped to run with the same scoped allow-list and to refuse
   ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``.
2. **Checkpoint writing** (the ``'local'`` file backend, mmengine/fileio/backends/
   local_backend.py): :class:`AtomicLocalBackend` is registered through mmengine's
   ``register_backend(..., force=True)``; its ``put`` / ``put_text`` write a temporary file next
   to the target, ``fsync`` it and rename it over the target
   (:func:`eomt_mm.utils.io.atomic_write`), where mmengine's ``open(path, 'wb')`` left a
   truncated ``iter_N.pth`` (or a truncated ``best_*.pth`` that replaced a good one) after a
   crash, a full disk or a kill. Cached plain ``LocalBackend`` instances are dropped.
3. **The ``last_checkpoint`` record** (mmengine/hooks/checkpoint_hook.py): the module-level name
   ``open`` of ``mmengine.hooks.checkpoint_hook`` is set to :func:`_checkpoint_hook_open`, so
   ``CheckpointHook``'s ``open(save_file, 'w')`` of ``work_dir/last_checkpoint`` is written
   atomically too (a kill between truncating and writing it left it empty and ``--resume``
   failed although every checkpoint was intact). Reads and other modes are the builtin ``open``.

These replace internals of mmengine, so the installation refuses mmengine versions it was not
checked against (:data:`SUPPORTED_MMENGINE_VERSIONS`).
"""
from __future__ import annotations

import builtins
import io
from pathlib import Path
from typing import Any, Optional, Union

import mmengine
from mmengine.fileio import LocalBackend, register_backend
from mmengine.fileio import io as mmengine_fileio
from mmengine.fileio.backends import registry_utils as mmengine_backends
from mmengine.hooks import checkpoint_hook
from mmengine.runner.checkpoint import CheckpointLoader

from eomt_mm.utils.io import atomic_write_bytes

from .checkpoint import (is_weights_only_loader, load_from_local_weights_only,
                         wrap_remote_loader)

__all__ = [
    'SUPPORTED_MMENGINE_VERSIONS', 'UnsupportedMMEngineError', 'AtomicLocalBackend',
    'check_mmengine_version', 'install_safe_checkpointing', 'is_installed'
]

#: mmengine versions whose ``CheckpointLoader``, ``LocalBackend`` and ``CheckpointHook`` the
#: installation was written and tested for.
SUPPORTED_MMENGINE_VERSIONS = ('0.10.7', )


class UnsupportedMMEngineError(RuntimeError):
    """The installed mmengine is not a version safe checkpointing was written for."""


class AtomicLocalBackend(LocalBackend):
    """mmengine's local file backend with atomic ``put`` and ``put_text``.

    Registered as mmengine's ``'local'`` backend (prefix ``''``), which is what
    ``mmengine.runner.checkpoint.save_checkpoint`` uses for local paths. All reading methods
    are inherited unchanged.
    """

    def put(self, obj: bytes, filepath: Union[str, Path]) -> None:
        """Atomically write bytes to ``filepath`` (creating its directory).

        Args:
            obj: Data to be written.
            filepath: Path to write data.
        """
        atomic_write_bytes(filepath, obj)

    def put_text(self, obj: str, filepath: Union[str, Path],
                 encoding: str = 'utf-8') -> None:
        """Atomically write text to ``filepath`` (creating its directory).

        Args:
            obj: Text to be written.
            filepath: Path to write data.
            encoding: Text encoding.
        """
        atomic_write_bytes(filepath, obj.encode(encoding))


class _AtomicTextFile(io.StringIO):
    """Text buffer that replaces ``path`` atomically when closed (not when a ``with`` block
    that wrote it raised: then the old file stays).

    Args:
        path: The file to replace.
        encoding: Text encoding (None: UTF-8).
    """

    def __init__(self, path: str, encoding: Optional[str]) -> None:
        super().__init__()
        self._path = path
        self._encoding = encoding or 'utf-8'
        self._discard = False

    def close(self) -> None:
        if self.closed:
            return
        data = None if self._discard else self.getvalue().encode(self._encoding)
        # Closed first: a failed write must not be retried when the buffer is collected.
        super().close()
        if data is not None:
            atomic_write_bytes(self._path, data)

    def __exit__(self, exc_type, exc, tb) -> None:
        self._discard = exc_type is not None
        self.close()


def _checkpoint_hook_open(file: Any, mode: str = 'r', *args: Any, **kwargs: Any) -> Any:
    """``open`` as seen by mmengine's ``checkpoint_hook`` module.

    ``CheckpointHook`` records the newest checkpoint in ``work_dir/last_checkpoint`` with a
    plain ``open(path, 'w')``, which truncates the file before writing it: a process killed
    in between leaves it empty, and ``--resume`` then fails with "Checkpoint file '' does not
    exist" although every checkpoint is intact. Text writes from that module go through
    :func:`eomt_mm.utils.io.atomic_write_bytes` instead; anything else is the builtin ``open``.

    Args:
        file: Path (or file descriptor) to open.
        mode: ``open`` mode.
        *args: Passed to ``open``.
        **kwargs: Passed to ``open`` (``encoding`` is honoured by atomic writes).

    Returns:
        A file object.
    """
    if isinstance(file, (str, Path)) and mode in ('w', 'wt'):
        return _AtomicTextFile(str(file), kwargs.get('encoding'))
    return builtins.open(file, mode, *args, **kwargs)


def check_mmengine_version(version: Optional[str] = None) -> None:
    """Refuse an mmengine that safe checkpointing was not written for.

    Args:
        version: The version to check; None reads ``mmengine.__version__``.

    Raises:
        UnsupportedMMEngineError: If the version is not in :data:`SUPPORTED_MMENGINE_VERSIONS`.
    """
    version = mmengine.__version__ if version is None else version
    if version in SUPPORTED_MMENGINE_VERSIONS:
        return
    supported = ', '.join(SUPPORTED_MMENGINE_VERSIONS)
    raise UnsupportedMMEngineError(
        f"eomt_mm's safe checkpointing was written for mmengine {supported} but found mmengine "
        f'{version}; nothing was changed. It replaces mmengine internals (the CheckpointLoader '
        "schemes of mmengine/runner/checkpoint.py, the 'local' file backend of "
        'mmengine/fileio/backends/local_backend.py, the `open` of '
        'mmengine/hooks/checkpoint_hook.py). Install a supported version '
        f"(pip install 'mmengine=={SUPPORTED_MMENGINE_VERSIONS[-1]}'), or, to support "
        f'mmengine {version}, check those three files against {supported}, run '
        'tests/test_engine_checkpoint.py and add the version to '
        'eomt_mm.engine.safe_checkpoint.SUPPORTED_MMENGINE_VERSIONS.')


def is_installed() -> bool:
    """Whether mmengine is in the state :func:`install_safe_checkpointing` puts it in.

    Read from mmengine itself (not a flag), so a scheme or backend registered over ours
    afterwards shows as not installed.

    Returns:
        True when every ``CheckpointLoader`` scheme is weights-only, the local one is
        :func:`~eomt_mm.engine.checkpoint.load_from_local_weights_only`, the ``'local'`` file
        backend is :class:`AtomicLocalBackend` and ``CheckpointHook`` writes
        ``last_checkpoint`` atomically.
    """
    schemes = CheckpointLoader._schemes
    return (schemes.get('') is load_from_local_weights_only
            and all(is_weights_only_loader(loader) for loader in schemes.values())
            and mmengine_backends.backends.get('local') is AtomicLocalBackend
            and mmengine_backends.prefix_to_backends.get('') is AtomicLocalBackend
            and getattr(checkpoint_hook, 'open', None) is _checkpoint_hook_open)


def install_safe_checkpointing() -> None:
    """Install weights-only loading and atomic checkpoint writes into mmengine.

    What changes and why: see this module's docstring. Idempotent: a second call (or a call
    after importing :mod:`eomt_mm.engine.safe_checkpoint_install`) changes nothing.

    Raises:
        UnsupportedMMEngineError: If mmengine is not one of
            :data:`SUPPORTED_MMENGINE_VERSIONS` (then nothing is changed).
    """
    check_mmengine_version()
    if is_installed():
        return
    for prefix, loader in list(CheckpointLoader._schemes.items()):
        if prefix != '':
            CheckpointLoader.register_scheme(
                prefixes=prefix, loader=wrap_remote_loader(loader), force=True)
    CheckpointLoader.register_scheme(
        prefixes='', loader=load_from_local_weights_only, force=True)

    register_backend('local', AtomicLocalBackend, force=True, prefixes='')
    checkpoint_hook.open = _checkpoint_hook_open
    # get_file_backend(enable_singleton=True) caches instances; drop plain LocalBackends
    # created before the installation so they are rebuilt as ours.
    for key, backend in list(mmengine_fileio.backend_instances.items()):
        if type(backend) is LocalBackend:
            del mmengine_fileio.backend_instances[key]
