"""The DINOv3 experiment configs: each parameter's learning rate over the schedule follows the
rule its config states, checked on a tiny DINOv3 built from the config itself (its optimizer
wrapper constructor, its schedulers, stepped as mmengine's ParamSchedulerHook does)."""
from pathlib import Path

import pytest
import torch
from mmengine import Config
from mmengine.optim import build_optim_wrapper
from mmengine.registry import HOOKS, PARAM_SCHEDULERS, init_default_scope
from mmseg.registry import MODELS

from eomt_mm.engine.amp import fall_back_to_fp32_on_cpu

ROOT = Path(__file__).resolve().parents[1]
EOMT = ROOT / 'configs' / 'eomt'
ADE = EOMT / 'eomt_dinov3-l_1xb16-20k_ade20k-512x512.py'
CITYSCAPES = EOMT / 'eomt_dinov3-l_1xb16-20k_cityscapes-1024x1024.py'
LORA = EOMT / 'eomt-lora-r8_dinov3-b_1xb16-20k_cityscapes-640x640.py'
# The RbA configs: the DINOv3 one inherits from the DINOv2 one, whatever its schedule is called.
(RBA, ) = EOMT.glob('eomt-lora-r8-rba_dinov3-*.py')
(RBA_DINOV2, ) = EOMT.glob('eomt-lora-r8-rba_dinov2-*.py')
LAYERS = 4
# Schedulers stepped before any optimizer step (no training here) make mmengine warn.
pytestmark = [pytest.mark.filterwarnings('ignore:Detected call of'),
              pytest.mark.filterwarnings('ignore:AmpOptimWrapper needs a GPU')]
TINY = dict(embed_dims=32, num_layers=LAYERS, num_heads=2, feedforward_channels=64)


def _build(path, backbone_type=None):
    """Model (tiny backbone, no pretrained file), optimizer wrapper and schedulers of a config."""
    cfg = Config.fromfile(str(path))
    fall_back_to_fp32_on_cpu(cfg)  # as tools/train.py does without a GPU
    init_default_scope(cfg.default_scope)
    backbone = cfg.model.backbone
    if backbone_type is not None:
        assert backbone.type == backbone_type
    backbone.arch = dict(TINY)
    backbone.init_cfg = None
    cfg.model.decoder.update(num_queries=4, num_blocks=2)
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    schedulers = [PARAM_SCHEDULERS.build(dict(s), default_args=dict(optimizer=wrapper))
                  for s in cfg.param_scheduler]
    return cfg, model, wrapper, schedulers


def _param_lrs(model, wrapper):
    """``{parameter name: lr}`` over the optimizer's groups (whatever their grouping)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: g['lr'] for g in wrapper.optimizer.param_groups for p in g['params']}


def _lrs_at(model, wrapper, schedulers, iterations, resume_after=None):
    """``{iteration: {name: lr}}``, the schedulers stepped once after every iteration.

    Iterations after ``resume_after`` are reached as a resumed run reaches them: the schedulers'
    state (``last_step``) restored to the previous iteration, then one step. Stepping there one
    by one would take tens of seconds; only closed-form schedules (TwoStageWarmupPolyLR, whose
    value depends on the step alone) may be resumed this way.
    """
    out, step = {}, 0
    for it in sorted(iterations):
        if resume_after is not None and it > resume_after:
            assert all(type(s).__name__ == 'TwoStageWarmupPolyLR' for s in schedulers)
            for s in schedulers:
                state = s.state_dict()
                state.update(last_step=it - 1, _global_step=it - 1)
                s.load_state_dict(state)
                s.step()
            step = it
        while step < it:
            for s in schedulers:
                s.step()
            step += 1
        out[it] = _param_lrs(model, wrapper)
    return out


def _two_stage(t, base, backbone, warmup, total, power=0.9):
    """The reference's TwoStageWarmupPolySchedule, written out."""
    first, second = warmup
    if not backbone:
        return base * t / first if t < first else base * (1 - (t - first) / (total - first))**power
    if t < first:
        return 0.0
    if t < first + second:
        return base * (t - first) / second
    return base * (1 - (t - first - second) / (total - first - second))**power


def _layer_decay_factor(name, rate):
    """Config rule "block i: rate ** (L - 1 - i), the embeddings as block 0, the rest 1"."""
    if not name.startswith('backbone.'):
        return 1.0
    parts = name.split('.')
    if parts[1] == 'layers':
        return rate**(LAYERS - 1 - int(parts[2]))
    if parts[1] in ('cls_token', 'register_tokens', 'patch_embed'):
        return rate**(LAYERS - 1)
    assert parts[1] == 'ln1', name  # the final norm
    return 1.0


def _check(lrs, rule):
    for it, groups in lrs.items():
        for name, lr in groups.items():
            assert lr == pytest.approx(rule(it, name), rel=1e-9, abs=1e-15), (it, name)


def test_ade20k_every_parameter_at_the_base_lr_with_the_reference_warmup():
    cfg, model, wrapper, schedulers = _build(ADE, 'DINOv3')
    total = cfg.train_cfg.max_iters
    assert total == 20192 and cfg.optim_wrapper.optimizer.lr == 2e-4
    groups = wrapper.optimizer.param_groups
    assert set(_param_lrs(model, wrapper)) == {n for n, _ in model.named_parameters()}
    assert all(g['weight_decay'] == 0.05 for g in groups)
    iterations = [0, 1, 1000, 1999, 2000, 2001, 3500, 4999, 5000, 5001, 12000, total - 1]
    _check(_lrs_at(model, wrapper, schedulers, iterations, resume_after=5001),
           lambda t, name: _two_stage(t, 2e-4, name.startswith('backbone.'), (2000, 3000), total))
    hook = [HOOKS.build(dict(h)) for h in cfg.custom_hooks
            if h['type'] == 'MaskAnnealingHook'][0]
    assert (hook.start_iters, hook.end_iters) == ([0, 6520, 9780, 13040],
                                                  [3000, 9780, 13040, 16300])
    assert hook.probabilities(1500) == pytest.approx([0.5**0.9, 1.0, 1.0, 1.0])
    assert hook.probabilities(16300) == [0.0] * 4


def test_cityscapes_carries_the_dinov2_layer_decay_recipe():
    cfg, model, wrapper, schedulers = _build(CITYSCAPES, 'DINOv3')
    total = cfg.train_cfg.max_iters
    assert total == 19902
    assert set(_param_lrs(model, wrapper)) == {n for n, _ in model.named_parameters()}
    iterations = [0, 250, 499, 500, 1000, 1499, 1500, 10000, total - 1]
    _check(_lrs_at(model, wrapper, schedulers, iterations, resume_after=1500),
           lambda t, name: _two_stage(t, 1e-4 * _layer_decay_factor(name, 0.8),
                                      name.startswith('backbone.'), (500, 1000), total))


def test_lora_only_trainable_parameters_with_layer_decay():
    cfg, model, wrapper, schedulers = _build(LORA, 'DINOv3')
    total = cfg.train_cfg.max_iters
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    names = set(_param_lrs(model, wrapper))
    assert names == trainable
    assert any('lora_A' in n for n in names) and any(n.startswith('decoder.') for n in names)
    assert not any(n.endswith('attn.qkv.weight') for n in names)  # the frozen base
    _check(_lrs_at(model, wrapper, schedulers, [0, 499, 500, 1200, 1500, 9000, total - 1],
                   resume_after=1500),
           lambda t, name: _two_stage(t, 1e-4 * _layer_decay_factor(name, 0.8),
                                      name.startswith('backbone.'), (500, 1000), total))


def test_rba_follows_the_dinov2_rba_recipe():
    """The rule of the DINOv3 RbA config is "that of the DINOv2 RbA config": the same learning
    rate for every parameter at every checked iteration (both with the same tiny backbone)."""
    cfg, model, wrapper, schedulers = _build(RBA, 'DINOv3')
    ref_cfg, ref_model, ref_wrapper, ref_schedulers = _build(RBA_DINOV2, 'DINOv2')
    assert cfg.train_cfg.max_iters == ref_cfg.train_cfg.max_iters
    assert cfg.optim_wrapper == ref_cfg.optim_wrapper
    names = set(_param_lrs(model, wrapper))
    assert names == {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == set(_param_lrs(ref_model, ref_wrapper))
    total = cfg.train_cfg.max_iters
    iterations = [0, 1, total // 100, total // 20, total // 4, total // 2, total - 1]
    ours = _lrs_at(model, wrapper, schedulers, iterations)
    reference = _lrs_at(ref_model, ref_wrapper, ref_schedulers, iterations)
    for it in iterations:
        assert ours[it] == pytest.approx(reference[it], rel=1e-12), it
    assert cfg.load_from != ref_cfg.load_from  # a DINOv3 start checkpoint
