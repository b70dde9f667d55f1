"""``apply_lora``: validate a ``lora_config`` once, inject LoRA and freeze the base."""
from __future__ import annotations

from typing import Mapping, Optional, Union

from torch import nn

from .config import LORA_CONFIG_ATTR, LoRAConfig
from .freeze import freeze_from_config
from .inject import inject_from_config
from .layer import LoRALinear

__all__ = ['apply_lora', 'get_lora_config']


def apply_lora(model: nn.Module,
               lora_config: Union[None, Mapping, LoRAConfig]) -> nn.Module:
    """Validate ``lora_config``, inject LoRA and freeze the base, in place.

    Call it when the model is built (a model's ``__init__`` or the ``WithLoRA``
    builder), so ``requires_grad`` is settled before the Runner wraps the model in DDP.

    Args:
        model (nn.Module): The model to adapt.
        lora_config (dict | LoRAConfig | None): The config block. None or
            ``enabled=False`` leaves the model untouched (the block is still validated).

    Returns:
        nn.Module: ``model`` itself, with the plain-dict config recorded as
        ``model._lora_config`` (see :func:`get_lora_config`).
    """
    if lora_config is None:
        return model
    cfg = LoRAConfig.from_dict(lora_config)
    if not cfg.enabled:
        return model
    inject_from_config(model, cfg)
    if not cfg.adapter_enabled:
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.adapter_enabled = False
    if cfg.freeze_base_model:
        freeze_from_config(model, cfg)
    setattr(model, LORA_CONFIG_ATTR, cfg.to_dict())
    return model


def get_lora_config(model: nn.Module) -> Optional[LoRAConfig]:
    """The config :func:`apply_lora` applied to ``model``, or None.

    Args:
        model (nn.Module): A model :func:`apply_lora` may have adapted.

    Returns:
        LoRAConfig | None: The recorded config.
    """
    cfg = getattr(model, LORA_CONFIG_ATTR, None)
    return None if cfg is None else LoRAConfig.from_dict(cfg)
