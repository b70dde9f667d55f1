"""eomt_mm: EoMT and LoRA for MMSegmentation.

Importing this package registers every component into the OpenMMLab registries
(``mmseg.registry.MODELS``, ``HOOKS``, ``METRICS``, ``DATASETS``, ``TRANSFORMS`` and
``mmengine.registry.MODELS`` for :class:`~eomt_mm.lora.LoRALinear`). Configs load it with::

    custom_imports = dict(imports=['eomt_mm'], allow_failed_imports=False)
"""
from .version import __version__
from . import engine  # noqa: F401  (first: safe checkpoint loading is installed on import)
from . import lora  # noqa: F401
from . import models  # noqa: F401
from . import anomaly  # noqa: F401
from . import datasets  # noqa: F401

__all__ = ['__version__']
