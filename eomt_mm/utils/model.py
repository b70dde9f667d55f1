"""Model helpers shared by the LoRA toolkit, the hooks and the tools."""
from __future__ import annotations

from mmengine.model import is_model_wrapper
from torch import nn

__all__ = ['unwrap_model']


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare model inside (possibly nested) DDP / FSDP / mmengine model wrappers.

    mmengine's ``is_model_wrapper`` knows every registered wrapper; each keeps the wrapped
    model as ``.module``.

    Args:
        model: A model or a model wrapper.

    Returns:
        The innermost model.

    Raises:
        TypeError: If ``model`` is not an ``nn.Module``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f'expected an nn.Module, got {type(model).__name__}')
    while is_model_wrapper(model):
        model = model.module
    return model
