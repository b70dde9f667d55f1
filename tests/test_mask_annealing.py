"""Mask annealing schedule, hook and resume behaviour."""
import logging
from types import SimpleNamespace

import pytest
import torch
from mmseg.registry import HOOKS, MODELS

from eomt_mm.engine.hooks.mask_annealing_hook import (MaskAnnealingHook, mask_annealing_windows,
                                                      mask_keep_probability)


def tiny_eomt(num_blocks=2):
    return MODELS.build(dict(
        type='EoMT',
        backbone=dict(type='DINOv2', arch=dict(embed_dims=32, num_layers=4, num_heads=2,
                                               feedforward_channels=64),
                      img_size=32, patch_size=8, num_register_tokens=0),
        decoder=dict(type='EoMTDecoder', num_classes=3, num_queries=4, num_blocks=num_blocks,
                     num_points=16)))


def fake_runner(model, it, max_iters=1000):
    return SimpleNamespace(model=model, iter=it, max_iters=max_iters,
                           logger=logging.getLogger('test'))


@pytest.mark.parametrize('total,blocks,starts,ends', [
    (19902, 4, [3317, 6634, 9951, 13268], [6634, 9951, 13268, 16585]),  # Cityscapes ViT-L
    (88692, 3, [14782, 36955, 59128], [29564, 51737, 73910]),  # COCO 12 ep, 3 blocks
    (88692, 4, [14782, 29564, 44346, 59128], [29564, 44346, 59128, 73910]),  # COCO ViT-L
    (88692, 5, [14782, 25869, 36955, 48042, 59128], [29564, 40651, 51737, 62824, 73910]),
    (177384, 3, [29564, 73910, 118256], [59128, 103474, 147820]),  # COCO 2x
    (39120, 4, [6520, 13040, 19560, 26080], [13040, 19560, 26080, 32600]),  # ADE20K
])
def test_windows_match_reference_configs(total, blocks, starts, ends):
    assert mask_annealing_windows(total, blocks) == (starts, ends)


def test_single_block_window_and_bad_arguments():
    assert mask_annealing_windows(600, 1) == ([100], [500])
    with pytest.raises(ValueError):
        mask_annealing_windows(600, 0)
    with pytest.raises(ValueError):
        mask_annealing_windows(3, 2)


@pytest.mark.parametrize('it,expected', [
    (0, 1.0), (3316, 1.0), (3317, 1.0), (4000, (1 - 683 / 3317)**0.9),
    (4975, (1 - 1658 / 3317)**0.9), (6633, (1 / 3317)**0.9), (6634, 0.0), (19000, 0.0)])
def test_keep_probability_formula(it, expected):
    assert mask_keep_probability(it, 3317, 6634, 0.9) == pytest.approx(expected, rel=1e-12)


def test_hook_sets_buffer_every_iteration():
    model = tiny_eomt()
    hook = HOOKS.build(dict(type='MaskAnnealingHook', start_iters=[100, 200],
                            end_iters=[200, 300], power=0.9))
    for it, expected in [(0, [1, 1]), (150, [0.5**0.9, 1]), (200, [0, 1]),
                         (260, [0, 0.4**0.9]), (300, [0, 0])]:
        hook.before_train_iter(fake_runner(model, it), batch_idx=it)
        torch.testing.assert_close(model.decoder.attn_mask_probs,
                                   torch.tensor(expected, dtype=torch.float32))


def test_hook_unwraps_model_wrappers():
    from mmengine.model import MMDistributedDataParallel

    model = tiny_eomt()
    # A wrapper instance without a process group: only `.module` is used by the hook.
    wrapper = MMDistributedDataParallel.__new__(MMDistributedDataParallel)
    torch.nn.Module.__init__(wrapper)
    wrapper.module = model
    hook = MaskAnnealingHook(start_iters=[10, 20], end_iters=[20, 30])
    hook.before_train_iter(fake_runner(wrapper, 25), batch_idx=0)
    torch.testing.assert_close(model.decoder.attn_mask_probs,
                               torch.tensor([0.0, 0.5**0.9]))


def test_hook_auto_windows_from_max_iters():
    model = tiny_eomt(num_blocks=3)
    hook = MaskAnnealingHook(auto_windows=True)
    hook.before_train(fake_runner(model, 0, max_iters=88692))
    assert (hook.start_iters, hook.end_iters) == ([14782, 36955, 59128], [29564, 51737, 73910])
    hook.before_train_iter(fake_runner(model, 36955 + 7391, max_iters=88692), batch_idx=0)
    torch.testing.assert_close(model.decoder.attn_mask_probs,
                               torch.tensor([0.0, 0.5**0.9, 1.0]))


def test_state_survives_resume(tmp_path):
    model = tiny_eomt()
    hook = MaskAnnealingHook(start_iters=[100, 200], end_iters=[200, 300])
    hook.before_train_iter(fake_runner(model, 250), batch_idx=0)
    path = tmp_path / 'ckpt.pth'
    torch.save(model.state_dict(), path)

    # The buffer is part of the checkpoint ...
    resumed = tiny_eomt()
    state = torch.load(path, weights_only=True)
    assert 'decoder.attn_mask_probs' in state
    resumed.load_state_dict(state)
    torch.testing.assert_close(resumed.decoder.attn_mask_probs, model.decoder.attn_mask_probs)
    # ... and a fresh hook recomputes the same values from the restored iteration.
    fresh = tiny_eomt()
    MaskAnnealingHook(start_iters=[100, 200], end_iters=[200, 300]).before_train(
        fake_runner(fresh, 250))
    torch.testing.assert_close(fresh.decoder.attn_mask_probs, model.decoder.attn_mask_probs)


def test_hook_errors():
    with pytest.raises(ValueError, match='start < end'):
        MaskAnnealingHook(start_iters=[10], end_iters=[10])
    with pytest.raises(ValueError, match='auto_windows'):
        MaskAnnealingHook()
    with pytest.raises(ValueError, match='both'):
        MaskAnnealingHook(start_iters=[1])
    hook = MaskAnnealingHook(start_iters=[1, 2, 3], end_iters=[2, 3, 4])
    with pytest.raises(ValueError, match='3 windows but the model has 2'):
        hook.before_train(fake_runner(tiny_eomt(), 0))
    with pytest.raises(TypeError, match='attn_mask_probs'):
        hook.before_train(fake_runner(torch.nn.Linear(2, 2), 0))


@pytest.mark.slow
def test_runner_training_and_resume_keep_the_schedule(tmp_path):
    """A real mmengine Runner: the hook drives the buffer and resume continues the schedule."""
    import cv2
    import numpy as np
    from mmengine.config import Config
    from mmengine.runner import Runner

    rng = np.random.default_rng(0)
    for sub in ('img', 'ann'):
        (tmp_path / sub).mkdir()
    for i in range(2):
        label = rng.integers(0, 3, (4, 4)).repeat(8, 0).repeat(8, 1).astype(np.uint8)
        cv2.imwrite(str(tmp_path / 'img' / f'{i}.png'),
                    (label[..., None] * 60 + rng.integers(0, 20, (32, 32, 3))).astype(np.uint8))
        cv2.imwrite(str(tmp_path / 'ann' / f'{i}.png'), label)
    seen = []

    def cfg(max_iters, resume):
        return Config(dict(
            default_scope='mmseg',
            work_dir=str(tmp_path / 'work'),
            resume=resume,
            model=dict(
                type='EoMT',
                data_preprocessor=dict(type='SegDataPreProcessor', mean=[128.0] * 3,
                                       std=[64.0] * 3, size_divisor=8, seg_pad_val=255),
                backbone=dict(type='DINOv2', arch=dict(embed_dims=32, num_layers=4, num_heads=2,
                                                       feedforward_channels=64),
                              img_size=32, patch_size=8, num_register_tokens=0),
                decoder=dict(type='EoMTDecoder', num_classes=3, num_queries=4, num_blocks=2,
                             num_points=16)),
            train_dataloader=dict(
                batch_size=2, num_workers=0, sampler=dict(type='InfiniteSampler', shuffle=False),
                dataset=dict(type='BaseSegDataset', data_root=str(tmp_path),
                             data_prefix=dict(img_path='img', seg_map_path='ann'),
                             img_suffix='.png', seg_map_suffix='.png',
                             metainfo=dict(classes=('a', 'b', 'c')),
                             pipeline=[dict(type='LoadImageFromFile'),
                                       dict(type='LoadAnnotations'),
                                       dict(type='PackSegInputs')])),
            train_cfg=dict(type='IterBasedTrainLoop', max_iters=max_iters),
            optim_wrapper=dict(type='OptimWrapper',
                               optimizer=dict(type='AdamW', lr=1e-4, weight_decay=0.05)),
            custom_hooks=[dict(type='MaskAnnealingHook', start_iters=[1, 2], end_iters=[3, 5])],
            default_hooks=dict(checkpoint=dict(type='CheckpointHook', by_epoch=False,
                                               interval=2),
                               logger=dict(type='LoggerHook', interval=1)),
            env_cfg=dict(dist_cfg=dict(backend='gloo')),
            log_level='WARNING'))

    from mmengine.hooks import Hook

    class Record(Hook):
        def before_train_iter(self, runner, batch_idx, data_batch=None):
            seen.append((runner.iter, runner.model.decoder.attn_mask_probs.tolist()))

    runner = Runner.from_cfg(cfg(2, False))
    runner.register_hook(Record(), priority='LOW')
    runner.train()
    resumed = Runner.from_cfg(cfg(4, True))
    resumed.register_hook(Record(), priority='LOW')
    resumed.train()
    hook = MaskAnnealingHook(start_iters=[1, 2], end_iters=[3, 5])
    assert [it for it, _ in seen] == [0, 1, 2, 3]
    for it, probs in seen:
        assert probs == pytest.approx(hook.probabilities(it), rel=1e-6), it
