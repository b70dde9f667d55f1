"""A DDP model wrapper that also works for CPU modules (gloo).

mmengine's ``Runner.wrap_model`` (and ``DDPStrategy`` of ``FlexibleRunner``)
always passes ``device_ids=[LOCAL_RANK]`` to the wrapper. torch's
``DistributedDataParallel`` rejects ``device_ids`` for a module whose
parameters live on the CPU, so multi-process training on machines without
GPUs fails before the first iteration. This subclass of mmengine's
``MMDistributedDataParallel`` drops ``device_ids``/``output_device`` exactly
in that case and is otherwise identical, so it is safe on GPUs too.
"""
from __future__ import annotations

from typing import Any

from mmengine.model import MMDistributedDataParallel
from mmengine.registry import MODEL_WRAPPERS
from torch import nn

__all__ = ['CpuAwareDistributedDataParallel', 'module_device_type']


def module_device_type(module: nn.Module) -> str:
    """Return the device type of a module's parameters and buffers.

    Args:
        module: The module to inspect.

    Returns:
        ``'cpu'``, ``'cuda'``, ... ; ``'cpu'`` for a module without tensors.

    Raises:
        ValueError: If the module's tensors are spread over several device
            types (DDP needs one device per process).
    """
    types = {t.device.type for t in module.parameters()}
    types |= {t.device.type for t in module.buffers()}
    if not types:
        return 'cpu'
    if len(types) > 1:
        raise ValueError(
            'CpuAwareDistributedDataParallel expects the whole module on one '
            f'device type, but found parameters/buffers on {sorted(types)}.')
    return types.pop()


# Registered in mmengine's root MODEL_WRAPPERS: Runner.wrap_model looks the
# type up there, and mmseg's MODEL_WRAPPERS (a child) falls back to it.
@MODEL_WRAPPERS.register_module()
class CpuAwareDistributedDataParallel(MMDistributedDataParallel):
    """``MMDistributedDataParallel`` that omits ``device_ids`` on CPU.

    Use it through the config (``tools/train.py`` sets it automatically when
    a ``pytorch`` launch finds no GPU)::

        model_wrapper_cfg = dict(type='CpuAwareDistributedDataParallel',
                                 broadcast_buffers=False)

    Args:
        module: The model to wrap; it must already be on its final device
            (mmengine moves it there before wrapping).
        detect_anomalous_params: See ``MMDistributedDataParallel``; debug
            only, slow.
        **kwargs: Arguments of ``torch.nn.parallel.DistributedDataParallel``.
            ``device_ids`` and ``output_device`` are removed when ``module``
            lives on the CPU (torch requires ``device_ids=None`` there).
    """

    def __init__(self,
                 module: nn.Module,
                 detect_anomalous_params: bool = False,
                 **kwargs: Any) -> None:
        if module_device_type(module) == 'cpu':
            kwargs.pop('device_ids', None)
            kwargs.pop('output_device', None)
        super().__init__(
            module=module,
            detect_anomalous_params=detect_anomalous_params,
            **kwargs)
