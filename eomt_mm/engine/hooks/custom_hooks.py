"""Add one of this project's hooks to a config's ``custom_hooks`` once.

``tools/train.py`` and ``tools/test.py`` add hooks the user's config need not name
(:class:`~eomt_mm.engine.hooks.RNGStateHook`, :class:`~eomt_mm.engine.hooks.FinishedRunHook`,
:class:`~eomt_mm.engine.hooks.LoRAConfigCheckHook`); a config that already lists the hook keeps
its own entry (and its arguments) instead of getting a second one.
"""
from __future__ import annotations

from typing import Type

from mmengine.config import Config
from mmengine.hooks import Hook

__all__ = ['add_custom_hook']


def add_custom_hook(cfg: Config, hook_class: Type[Hook]) -> bool:
    """Append ``dict(type=hook_class.__name__)`` to ``cfg.custom_hooks`` unless it is there.

    An entry counts as the hook when its ``type`` is the class or its registered name.

    Args:
        cfg: A training or test config; ``cfg.custom_hooks`` is replaced by a new list.
        hook_class: The hook, registered in mmseg's ``HOOKS`` under its class name.

    Returns:
        Whether the hook was added.
    """
    name = hook_class.__name__
    hooks = list(cfg.get('custom_hooks') or [])
    if any(h.get('type') in (name, hook_class) for h in hooks):
        return False
    hooks.append(dict(type=name))
    cfg.custom_hooks = hooks
    return True
