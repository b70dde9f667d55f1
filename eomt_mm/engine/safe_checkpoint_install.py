"""Importing this module installs eomt_mm's safe checkpointing into mmengine: that is its only
purpose.

It is the ``custom_imports`` form of
:func:`eomt_mm.engine.safe_checkpoint.install_safe_checkpointing`, for tools that do not call
it themselves (mmseg's own ``tools/train.py`` and ``tools/test.py``)::

    custom_imports = dict(imports=['eomt_mm', 'eomt_mm.engine.safe_checkpoint_install'],
                          allow_failed_imports=False)

(``configs/_base_/default_runtime.py`` has this line). What the installation changes in
mmengine, and why, is listed in :mod:`eomt_mm.engine.safe_checkpoint`. Importing it again, or
also calling the function, changes nothing more; an unsupported mmengine version stops the
import with :class:`~eomt_mm.engine.safe_checkpoint.UnsupportedMMEngineError`.
"""
from .safe_checkpoint import install_safe_checkpointing

install_safe_checkpointing()
