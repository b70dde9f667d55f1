"""eomt_mm: EoMT and LoRA for MMSegmentation.

Importing this package only registers components into the OpenMMLab registries
(``mmseg.registry.MODELS``, ``HOOKS``, ``METRICS``, ``DATASETS``, ``TRANSFORMS`` and
``mmengine.registry.MODELS`` for :class:`~eomt_mm.lora.LoRALinear`); it changes nothing in
mmengine. Safe checkpointing (weights-only loading, atomic checkpoint writes) is a separate,
explicit step: :func:`eomt_mm.engine.safe_checkpoint.install_safe_checkpointing`, which this
project's tools call, or, in a config, importing its installer module::

    custom_imports = dict(imports=['eomt_mm', 'eomt_mm.engine.safe_checkpoint_install'],
                          allow_failed_imports=False)
"""
from .version import __version__
from . import models  # noqa: F401
from . import lora  # noqa: F401
from . import anomaly  # noqa: F401
from . import datasets  # noqa: F401
from . import engine  # noqa: F401

__all__ = ['__version__']
