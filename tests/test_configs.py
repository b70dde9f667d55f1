"""Every experiment config in configs/ builds: model, optimizer wrapper, schedulers, hooks.

No data and no pretrained weights are needed (``init_weights`` is not called), so a config that
rots (a renamed argument, a missing registration, a broken ``_base_`` chain) fails here first.
"""
from pathlib import Path

import pytest
import torch
from mmengine import Config
from mmengine.hooks import Hook
from mmengine.optim import build_optim_wrapper
from mmengine.registry import HOOKS, PARAM_SCHEDULERS, init_default_scope
from mmseg.registry import MODELS

from eomt_mm.engine.amp import fall_back_to_fp32_on_cpu
from eomt_mm.anomaly.ensemble.stacked import StackedLoRALinear
from eomt_mm.lora import LoRALinear

CONFIG_DIR = Path(__file__).resolve().parents[1] / 'configs'
CONFIGS = sorted(p for p in CONFIG_DIR.rglob('*.py') if '_base_' not in p.parts)


def _type_name(component_cfg) -> str:
    """The class name a config's ``type`` names (a string, possibly scoped, or a class)."""
    declared = component_cfg['type']
    return declared.split('.')[-1] if isinstance(declared, str) else declared.__name__


def test_configs_found():
    names = {p.name for p in CONFIGS}
    assert {'eomt_lora_b640.py', 'eomt_full_b640.py'} <= names


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: str(p.relative_to(CONFIG_DIR)))
def test_config_builds(path):
    cfg = Config.fromfile(str(path))
    assert cfg.default_scope == 'mmseg'
    init_default_scope(cfg.default_scope)
    model = MODELS.build(cfg.model)
    # As tools/train.py does: an AMP config (the RbA recipe) trains in fp32 without a GPU.
    fall_back_to_fp32_on_cpu(cfg)
    optim_wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    schedulers = [
        PARAM_SCHEDULERS.build(dict(s), default_args=dict(optimizer=optim_wrapper))
        for s in cfg.param_scheduler
    ]
    hook_cfgs = cfg.get('custom_hooks', [])
    hooks = [HOOKS.build(dict(h)) for h in hook_cfgs]
    # Every experiment declares its learning-rate schedule; each declared scheduler and hook is
    # built as the class it names, in order, and the schedule acts on this optimizer wrapper for
    # the whole training loop.
    assert len(cfg.param_scheduler) >= 1
    assert [type(s).__name__ for s in schedulers] == [_type_name(s) for s in cfg.param_scheduler]
    assert all(s.optimizer is optim_wrapper for s in schedulers)
    assert max(s.end for s in schedulers) == cfg.train_cfg.max_iters
    assert [type(h).__name__ for h in hooks] == [_type_name(h) for h in hook_cfgs]
    assert all(isinstance(h, Hook) for h in hooks)

    in_optimizer = {id(p) for g in optim_wrapper.optimizer.param_groups for p in g['params']}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    # Exactly the trainable parameters are optimised: frozen ones carry no optimizer state.
    assert in_optimizer == trainable

    lora_cfg = cfg.model.get('lora_config')
    # An adapter ensemble holds its members' LoRA matrices stacked, one layer per base layer.
    lora_layers = [m for m in model.modules() if isinstance(m, (LoRALinear, StackedLoRALinear))]
    if lora_cfg and lora_cfg.get('enabled', True):
        assert lora_layers
        train_adapters = lora_cfg.get('train_adapters', True)
        assert all(m.lora_A.requires_grad == train_adapters and not m.weight.requires_grad
                   for m in lora_layers)
    else:
        assert not lora_layers
        assert all(p.requires_grad for p in model.parameters())
    torch.nn.Module.zero_grad(model)
