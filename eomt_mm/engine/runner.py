"""Choosing the runner a config asks for (shared by tools/train.py and tools/test.py)."""
from mmengine.config import Config
from mmengine.registry import RUNNERS
from mmengine.runner import FlexibleRunner, Runner


def build_runner(cfg: Config):
    """Build the config's ``runner_type``, else ``FlexibleRunner`` when the config has a
    ``strategy`` (FSDP, DeepSpeed, ...), else the plain ``Runner``.

    Args:
        cfg: A complete experiment config.

    Returns:
        The runner, not yet started.
    """
    if 'runner_type' in cfg:
        return RUNNERS.build(cfg)
    if cfg.get('strategy') is not None:
        return FlexibleRunner.from_cfg(cfg)
    return Runner.from_cfg(cfg)
