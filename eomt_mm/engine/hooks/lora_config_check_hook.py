"""``LoRAConfigCheckHook``: refuse a checkpoint trained with other LoRA settings.

``tools/test.py`` adds it: mmengine loads ``load_from`` weights without knowing that LoRA's
scaling (``lora_alpha``, ``use_rslora``) is not in them, so a checkpoint trained with alpha 16
evaluated under a config saying 32 would be scored with the wrong function and no message.
See :mod:`eomt_mm.engine.lora_record` for what is compared and where it is read from.
"""
from __future__ import annotations

from mmengine.config import Config
from mmengine.hooks import Hook
from mmseg.registry import HOOKS

from eomt_mm.lora.config import LORA_CONFIG_ATTR
from eomt_mm.utils.model import unwrap_model
from ..lora_record import check_lora_config, recorded_checkpoint_lora_config
from .custom_hooks import add_custom_hook

__all__ = ['LoRAConfigCheckHook', 'add_lora_config_check_hook']


@HOOKS.register_module()
class LoRAConfigCheckHook(Hook):
    """Compare a loaded checkpoint's training ``lora_config`` with the model's.

    Args:
        override (str): How the user skips the check, quoted in the error. Defaults to
            the flag of ``tools/test.py``.
    """

    priority = 'VERY_HIGH'

    def __init__(self, override: str = '--lora-from-config') -> None:
        self.override = override

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        recorded, trained = recorded_checkpoint_lora_config(checkpoint)
        if not recorded:
            runner.logger.info('LoRAConfigCheckHook: the checkpoint records no readable '
                               'training config; its LoRA settings are not compared')
            return
        model = unwrap_model(runner.model)
        # A test-time-augmentation wrapper (SegTTAModel) holds the segmentor as `module`.
        if not hasattr(model, LORA_CONFIG_ATTR) and hasattr(model, 'module'):
            model = unwrap_model(model.module)
        current = getattr(model, LORA_CONFIG_ATTR, None)
        source = f'checkpoint {runner.cfg.get("load_from")!r}'
        check_lora_config(trained, current, source, self.override)


def add_lora_config_check_hook(cfg: Config) -> bool:
    """Append ``LoRAConfigCheckHook`` to ``cfg.custom_hooks`` unless it is there.

    ``tools/test.py`` calls it unless run with ``--lora-from-config``.

    Args:
        cfg: A test config.

    Returns:
        Whether the hook was added (False: the config already lists it).
    """
    return add_custom_hook(cfg, LoRAConfigCheckHook)
