"""Layer-wise lr decay (mmpretrain constructor) + EoMT's two-stage warm-up poly schedule."""
import pytest
import torch
from mmengine.optim import build_optim_wrapper
from mmseg.registry import MODELS, PARAM_SCHEDULERS

LR, DECAY, DEPTH, TOTAL = 1e-4, 0.8, 4, 4000


def tiny_eomt():
    return MODELS.build(dict(
        type='EoMT',
        backbone=dict(type='DINOv2', arch=dict(embed_dims=32, num_layers=DEPTH, num_heads=2,
                                               feedforward_channels=64),
                      img_size=32, patch_size=8, num_register_tokens=4),
        decoder=dict(type='EoMTDecoder', num_classes=3, num_queries=4, num_blocks=2,
                     num_points=16)))


def build(model):
    wrapper = build_optim_wrapper(model, dict(
        type='OptimWrapper',
        optimizer=dict(type='AdamW', lr=LR, weight_decay=0.05),
        constructor='mmpretrain.LearningRateDecayOptimWrapperConstructor',
        paramwise_cfg=dict(layer_decay_rate=DECAY)))
    scheduler = PARAM_SCHEDULERS.build(dict(
        type='TwoStageWarmupPolyLR', optimizer=wrapper, warmup_iters=(500, 1000), power=0.9,
        begin=0, end=TOTAL, by_epoch=False))
    return wrapper, scheduler


def reference_lr(step, base, backbone):
    """tue-mps/eomt TwoStageWarmupPolySchedule.get_lr, restated."""
    if not backbone:
        if step < 500:
            return base * step / 500
        return base * (1 - (step - 500) / (TOTAL - 500))**0.9
    if step < 500:
        return 0.0
    if step < 1500:
        return base * (step - 500) / 1000
    return base * (1 - (step - 1500) / (TOTAL - 1500))**0.9


def test_layer_decay_matches_reference():
    wrapper, _ = build(tiny_eomt())
    groups = {g['param_name']: g for g in wrapper.optimizer.param_groups}
    expected = {
        'backbone.cls_token': DECAY**(DEPTH - 1),
        'backbone.register_tokens': DECAY**(DEPTH - 1),
        'backbone.pos_embed': DECAY**(DEPTH - 1),
        'backbone.patch_embed.projection.weight': DECAY**(DEPTH - 1),
        'backbone.layers.0.attn.qkv.weight': DECAY**(DEPTH - 1),
        'backbone.layers.2.ffn.layers.1.bias': DECAY**1,
        'backbone.layers.3.ln1.weight': 1.0,
        'backbone.ln1.weight': 1.0,
        'decoder.q.weight': 1.0,
        'decoder.class_head.weight': 1.0,
        'decoder.upscale.0.norm.weight': 1.0,
    }
    for name, scale in expected.items():
        assert groups[name]['initial_lr'] == pytest.approx(LR * scale), name
        assert groups[name]['weight_decay'] == 0.05
    assert 'decoder.attn_mask_probs' not in groups  # a buffer, not a parameter


def test_two_stage_warmup_poly():
    wrapper, scheduler = build(tiny_eomt())
    groups = wrapper.optimizer.param_groups
    index = {g['param_name']: i for i, g in enumerate(groups)}
    watch = {
        'backbone.layers.1.attn.qkv.weight': (LR * DECAY**2, True),
        'backbone.pos_embed': (LR * DECAY**3, True),
        'backbone.ln1.weight': (LR, True),
        'decoder.class_head.weight': (LR, False),
        'decoder.q.weight': (LR, False),
    }
    checkpoints = {0, 250, 500, 1000, 1500, 2000, TOTAL - 1}
    seen = {}
    for step in range(TOTAL):
        if step in checkpoints:
            seen[step] = {n: groups[index[n]]['lr'] for n in watch}
        wrapper.step()
        scheduler.step()
    for step in checkpoints:
        for name, (base, backbone) in watch.items():
            assert seen[step][name] == pytest.approx(reference_lr(step, base, backbone),
                                                     rel=1e-9, abs=1e-15), (step, name)
    # spot values written out: heads warm, backbone still frozen at 250; halfway at 1000
    assert seen[250]['decoder.q.weight'] == pytest.approx(LR / 2)
    assert seen[250]['backbone.ln1.weight'] == 0
    assert seen[500]['backbone.ln1.weight'] == 0
    assert seen[1000]['backbone.ln1.weight'] == pytest.approx(LR / 2)
    assert seen[1500]['backbone.ln1.weight'] == pytest.approx(LR)
    assert seen[1000]['decoder.q.weight'] == pytest.approx(LR * (1 - 500 / 3500)**0.9)


def test_scheduler_needs_named_groups_and_finite_end():
    model = tiny_eomt()
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    with pytest.raises(KeyError, match='param_name'):
        PARAM_SCHEDULERS.build(dict(type='TwoStageWarmupPolyLR', optimizer=opt, end=TOTAL))
    wrapper, _ = build(tiny_eomt())
    with pytest.raises(ValueError, match='finite end'):
        PARAM_SCHEDULERS.build(dict(type='TwoStageWarmupPolyLR', optimizer=wrapper))
    with pytest.raises(ValueError, match='does not fit'):
        PARAM_SCHEDULERS.build(dict(type='TwoStageWarmupPolyLR', optimizer=wrapper, end=1000))
