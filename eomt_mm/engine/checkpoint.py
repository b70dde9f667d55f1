"""Weights-only checkpoint loading for mmengine checkpoints.

mmengine 0.10.7 loads checkpoints with ``torch.load(filename)`` and no ``weights_only``
argument. Since torch 2.6 that means ``weights_only=True`` (see the ``torch.load`` documentation,
https://pytorch.org/docs/stable/generated/torch.load.html), and mmengine's own checkpoints then
fail to load (``resume=True`` stops with ``Unsupported global ... HistoryBuffer``) because they
pickle a few non-tensor objects into ``message_hub`` and ``meta``. Turning weights-only loading
off would execute arbitrary pickles, so instead the globals that mmengine writes are allow-listed
exactly (found with ``torch.serialization.get_unsafe_globals_in_checkpoint`` on checkpoints
written by ``Runner``/``CheckpointHook``) and every local checkpoint is loaded through
``torch.load(..., weights_only=True)`` inside a scoped ``torch.serialization.safe_globals``
context. Nothing is added to torch's process-wide allow-list.

This module only defines the loaders and has no side effect on import;
:func:`eomt_mm.engine.safe_checkpoint.install_safe_checkpointing` registers them with mmengine's
``CheckpointLoader``.
"""
from __future__ import annotations

import functools
import os
import os.path as osp
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Callable, List, Sequence, Tuple, Union

import numpy as np
import torch
from mmengine.logging.history_buffer import HistoryBuffer

__all__ = [
    'UnsafeCheckpointError', 'NotACheckpointError', 'MMENGINE_SAFE_GLOBALS',
    'load_checkpoint_weights_only',
    'load_from_local_weights_only', 'wrap_remote_loader', 'is_weights_only_loader'
]

# Marks the loaders of this module (and wrapped ones), so wrapping twice is a no-op.
_WEIGHTS_ONLY_MARK = '_eomt_mm_weights_only'

# HistoryBuffer.__getstate__ stores its class-level ``_statistics_methods``
# dict, whose values are the functions ``HistoryBuffer.min`` etc. Pickle
# protocol 2 (torch.save's default) writes a nested function as
# ``builtins.getattr(HistoryBuffer, 'min')``. A general ``getattr`` in the
# allow-list would let a crafted file reach any attribute of any allowed
# object, so the name ``builtins.getattr`` is bound to this function, which
# resolves only these four attributes of HistoryBuffer.
_HISTORY_BUFFER_STATISTICS = ('min', 'max', 'current', 'mean')


def _history_buffer_getattr(obj: Any, name: str) -> Callable:
    """Stand-in for ``getattr`` while unpickling a HistoryBuffer's state.

    Args:
        obj: The object whose attribute the pickle asks for; must be
            :class:`~mmengine.logging.HistoryBuffer`.
        name: The attribute; must be one of mmengine's built-in statistics
            methods (``min``, ``max``, ``current``, ``mean``).

    Returns:
        The requested method of HistoryBuffer.

    Raises:
        pickle.UnpicklingError: For any other object or attribute.
    """
    if obj is HistoryBuffer and name in _HISTORY_BUFFER_STATISTICS:
        return getattr(HistoryBuffer, name)
    raise pickle.UnpicklingError(
        f'GLOBAL builtins.getattr({obj!r}, {name!r}) was refused: the '
        'checkpoint allow-list only resolves HistoryBuffer.'
        f'{{{",".join(_HISTORY_BUFFER_STATISTICS)}}}')


def _numpy_globals() -> List[Union[Callable, Tuple[Callable, str]]]:
    """Numpy objects that mmengine stores in ``message_hub`` and ``meta``.

    HistoryBuffer keeps its history as numpy arrays and metrics/best scores are
    numpy scalars. Arrays pickle as ``_reconstruct(ndarray, ...)`` plus a
    dtype; scalars as ``scalar(dtype, bytes)``. The weights-only unpickler
    rebuilds a dtype with ``BUILD``, which it only allows for allow-listed
    types, so the concrete dtype classes of the numeric dtypes are listed too.
    Object, string, void and datetime dtypes are deliberately absent: mmengine
    never writes them and object arrays would carry arbitrary pickles.
    Numpy 1.x wrote ``numpy.core.multiarray``; numpy 2 writes
    ``numpy._core.multiarray``; both names map to the same functions so
    checkpoints from either era load.
    """
    core = np._core if hasattr(np, '_core') else np.core
    multiarray = core.multiarray
    out: List[Union[Callable, Tuple[Callable, str]]] = [np.ndarray, np.dtype]
    for fn_name in ('_reconstruct', 'scalar'):
        fn = getattr(multiarray, fn_name)
        for module in ('numpy._core.multiarray', 'numpy.core.multiarray'):
            out.append((fn, f'{module}.{fn_name}'))
    numeric = ('bool', 'int8', 'int16', 'int32', 'int64', 'uint8', 'uint16',
               'uint32', 'uint64', 'float16', 'float32', 'float64',
               'longdouble', 'complex64', 'complex128')
    for name in numeric:
        dtype_cls = type(np.dtype(name))
        if dtype_cls is not np.dtype:  # numpy >= 1.25 has one class per dtype
            out.append(dtype_cls)
    return out


#: Every global (besides torch's built-in weights-only set: tensors, storages,
#: dtypes, OrderedDict, primitive containers) that an mmengine 0.10.7
#: checkpoint written by ``Runner.save_checkpoint`` contains.
MMENGINE_SAFE_GLOBALS: Tuple[Union[Callable, Tuple[Callable, str]], ...] = (
    HistoryBuffer,
    (_history_buffer_getattr, 'builtins.getattr'),
    *_numpy_globals(),
)

_UNSAFE_GLOBAL_PATTERNS = (
    re.compile(r'GLOBAL (\S+) was not an allowed global'),
    re.compile(r'GLOBAL (\S+) whose module \S+ is blocked'),
    re.compile(r'unsupported GLOBAL (\S+)'),
    re.compile(r'(builtins\.getattr\(.*?\)) was refused'),
    re.compile(r'unrecognized function (.+?)(?: which belongs|$)', re.M),
    re.compile(r'allowlisted via `add_safe_globals`,? but got (.+)$', re.M),
)


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint holds pickled objects outside the weights-only allow-list.

    Subclasses :class:`pickle.UnpicklingError` so code that already handles
    torch's weights-only failures keeps working.

    Args:
        filename: The checkpoint file that was refused.
        offending: The globals (``module.name``) that are not allow-listed.
        detail: The unpickler's own message, for the cases where the problem
            is not a global name (e.g. a refused ``getattr``).
    """

    def __init__(self, filename: str, offending: Sequence[str],
                 detail: str = '') -> None:
        self.filename = filename
        self.offending = list(offending)
        what = ', '.join(self.offending) if self.offending else 'unknown'
        msg = (
            f'Refusing to load checkpoint {filename!r}: it contains pickled '
            f'object(s) outside the weights-only allow-list: {what}. '
            'eomt_mm loads every checkpoint with '
            'torch.load(weights_only=True) and never unpickles arbitrary '
            'objects; the allow-list is exactly what mmengine itself writes '
            '(tensors, plain containers, numpy arrays/scalars of numeric '
            'dtypes, mmengine HistoryBuffer). If you trust this file, re-save '
            'only its tensors, e.g. '
            "torch.save({'state_dict': model.state_dict()}, path).")
        reason = _unpickler_reason(detail)
        if reason:
            msg += f' Unpickler said: {reason}'
        super().__init__(msg)


class NotACheckpointError(RuntimeError):
    """A file is not a readable torch checkpoint: empty, truncated, corrupt or another type.

    Args:
        filename: The file that was refused.
        reason: What the reader said (never torch's advice to load unsafely).
    """

    def __init__(self, filename: str, reason: str) -> None:
        self.filename = filename
        size = osp.getsize(filename) if osp.isfile(filename) else 0
        what = 'an empty file' if size == 0 else f'{size} bytes'
        super().__init__(
            f'Checkpoint file {filename!r} is not a torch checkpoint (corrupt or wrong file '
            f'type; {what}): {reason.splitlines()[0] if reason else "unreadable"}. Expected '
            'a file written by torch.save (a zip archive); a truncated or corrupt copy must '
            'be copied or saved again.')


def _undecodable(filename: str, message: str) -> bool:
    """Whether a weights-only failure means "not a pickle torch can read" (no refused object).

    torch's unpickler reports bytes that are no pickle opcode it knows as "Unsupported
    operand N": random bytes, a numpy ``.npy`` file, a plain ``pickle.dump`` (protocol 4+,
    which ``torch.save`` never writes by default) or text. A refused object is reported with
    its name instead (``GLOBAL ... was not an allowed global``).

    Args:
        filename: The file ``torch.load`` failed on.
        message: torch's error message.

    Returns:
        True when the failure is about the bytes, not about an object in them.
    """
    if not re.search(r'Unsupported operand|invalid load key|unpickling stack underflow|'
                     r'pickle data was truncated|could not find MARK', message):
        return False
    # torch's own format is a zip archive; inside one, "Unsupported operand" is a pickle
    # written with a newer protocol (torch.save(..., pickle_protocol=4)), which is still
    # decodable in principle, so it stays an unsafe-loading refusal with the reason.
    return not zipfile.is_zipfile(filename)


def _unpickler_reason(message: str) -> str:
    """Extract the weights-only unpickler's own reason from torch's message.

    torch wraps the reason in advice on how to disable weights-only loading,
    which is exactly the advice this project must not give.
    """
    found = re.search(r'WeightsUnpickler error: ([^\n]+)', message)
    if found:
        # Drop torch's "Please use add_safe_globals(...)" advice.
        return found.group(1).split(' Please use ')[0].strip()
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    lines = [line for line in lines if 'weights_only' not in line
             and 'Weights only load failed' not in line]
    return lines[-1] if lines else ''


def _offending_globals(filename: str, message: str) -> List[str]:
    """Name the non-allow-listed globals of ``filename`` (best effort).

    Args:
        filename: Checkpoint path (already opened once by ``torch.load``).
        message: The UnpicklingError text, used when the file cannot be
            scanned (legacy non-zip format) or when the failure is not a name.

    Returns:
        Sorted offending global names; may be empty.
    """
    names: set = set()
    try:
        # Called inside the safe_globals context, so the allow-list is
        # subtracted and only the truly offending names remain.
        names.update(
            torch.serialization.get_unsafe_globals_in_checkpoint(filename))
    except Exception:  # noqa: BLE001  legacy/odd files: fall back to message
        pass
    if not names:
        # The scan lists names only; refusals of other kinds (a getattr on a
        # non-allowed attribute, a call of a non-allowed object) are in the
        # message.
        for pattern in _UNSAFE_GLOBAL_PATTERNS:
            names.update(m.strip() for m in pattern.findall(message))
    return sorted(names)


def _check_weights_only_not_disabled() -> None:
    """Refuse to run remote loaders when torch's default is switched off.

    mmengine's remote loaders call ``torch.load`` without ``weights_only``,
    so ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` would make them unpickle
    arbitrary objects.
    """
    flag = os.getenv('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD', '0').lower()
    if flag in ('1', 'y', 'yes', 'true'):
        raise RuntimeError(
            'TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD is set, which would make '
            "mmengine's remote checkpoint loaders unpickle arbitrary objects; "
            'eomt_mm refuses that. Unset it, or download the file and load it '
            'by its local path.')


def _safe_context() -> torch.serialization.safe_globals:
    # Only what is not allow-listed already: torch's context removes its
    # entries on exit and would otherwise drop a user's own add_safe_globals.
    present = set(torch.serialization.get_safe_globals())
    return torch.serialization.safe_globals(
        [g for g in MMENGINE_SAFE_GLOBALS if g not in present])


def load_checkpoint_weights_only(filename: Union[str, Path],
                                 map_location: Any = None) -> Any:
    """Load a local checkpoint with ``torch.load(weights_only=True)``.

    Registered with mmengine's :class:`CheckpointLoader` for local paths, so
    ``Runner`` (``load_from``, ``resume=True``), ``load_checkpoint`` and
    ``init_cfg=dict(type='Pretrained')`` all come through here.

    Args:
        filename: Path of the checkpoint file (``~`` is expanded).
        map_location: Same as :func:`torch.load`.

    Returns:
        The loaded object (usually a dict).

    Raises:
        FileNotFoundError: If the file does not exist.
        UnsafeCheckpointError: If the file pickles anything outside
            :data:`MMENGINE_SAFE_GLOBALS` and torch's weights-only set.
        NotACheckpointError: If the file is not a readable torch checkpoint (empty,
            truncated, corrupt, another file type); a RuntimeError.
    """
    filename = osp.expanduser(str(filename))
    if not osp.isfile(filename):
        raise FileNotFoundError(
            f'Checkpoint file {filename!r} does not exist.')
    with _safe_context():
        try:
            return torch.load(
                filename, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as err:
            offending = _offending_globals(filename, str(err))
            if offending or ('Weights only load failed' in str(err)
                             and not _undecodable(filename, str(err))):
                raise UnsafeCheckpointError(filename, offending,
                                            str(err)) from None
            raise NotACheckpointError(filename, _unpickler_reason(str(err))) from None
        except (FileNotFoundError, PermissionError):
            raise
        except (RuntimeError, OSError, EOFError, KeyError, ValueError) as err:
            # A truncated zip raises RuntimeError or OSError(EINVAL); a file
            # that is not a zip falls into torch's legacy reader and fails
            # with KeyError/EOFError.
            raise NotACheckpointError(filename, f'{type(err).__name__}: {err}') from None


def wrap_remote_loader(loader: Callable) -> Callable:
    """Run one of mmengine's non-local loaders with the allow-list in scope.

    Those loaders download or stream the file and call ``torch.load`` without
    ``weights_only``, which torch >= 2.6 treats as ``weights_only=True``
    (checked by :func:`_check_weights_only_not_disabled`). The scoped
    allow-list makes mmengine checkpoints from model zoos load as well.

    Args:
        loader: The original ``loader(filename, map_location)``.

    Returns:
        The wrapped loader (keeps the name mmengine logs).
    """
    if is_weights_only_loader(loader):
        return loader

    @functools.wraps(loader)
    def wrapped(filename: str, map_location: Any = None) -> Any:
        _check_weights_only_not_disabled()
        with _safe_context():
            try:
                return loader(filename, map_location)
            except pickle.UnpicklingError as err:
                if isinstance(err, UnsafeCheckpointError):
                    raise
                raise UnsafeCheckpointError(
                    filename, _offending_globals('', str(err)),
                    str(err)) from None

    setattr(wrapped, _WEIGHTS_ONLY_MARK, True)
    return wrapped


def load_from_local_weights_only(filename: str,
                                 map_location: Any = None) -> Any:
    """mmengine's local-path loader; see :func:`load_checkpoint_weights_only`.

    A separate name because mmengine logs ``loader.__name__[10:]`` as the
    backend ("Loads checkpoint by local_weights_only backend").

    Args:
        filename: Path of the checkpoint file.
        map_location: Same as :func:`torch.load`.

    Returns:
        The loaded object.
    """
    return load_checkpoint_weights_only(filename, map_location)


setattr(load_from_local_weights_only, _WEIGHTS_ONLY_MARK, True)


def is_weights_only_loader(loader: Callable) -> bool:
    """Whether ``loader`` is one of this module's loaders or wrapped by :func:`wrap_remote_loader`.

    Args:
        loader: A loader registered with mmengine's ``CheckpointLoader``.

    Returns:
        True for :func:`load_from_local_weights_only` and wrapped remote loaders.
    """
    return bool(getattr(loader, _WEIGHTS_ONLY_MARK, False))
