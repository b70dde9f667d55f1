"""A tiny mmseg training set-up for the engine/tool tests (not collected).

Writes into a folder: 8 generated 32x32 images with 3-class label maps in a
plain ``img/`` + ``ann/`` layout, a helper module with test hooks, and a
config (mmseg ``EncoderDecoder``, a 2-layer 32-dim mmpretrain ViT whose patch
embedding, position embedding, class token and first block are frozen at
build via ``frozen_stages=1``, and an ``FCNHead``).
"""
import os
import textwrap
from pathlib import Path

import cv2
import numpy as np

HELPER_MODULE = 'engine_test_hooks'

_HOOKS_SRC = '''
"""Hooks used by eomt_mm's engine tests (generated)."""
import os

import torch
import torch.distributed as torch_dist
from mmengine.dist import get_rank
from mmengine.hooks import Hook
from mmseg.registry import HOOKS

from eomt_mm.utils.model import unwrap_model


@HOOKS.register_module()
class DumpRankState(Hook):
    """Saves, per rank, the weights before/after training and what ran."""

    priority = 'LOWEST'

    def __init__(self):
        self.seen = []
        self.initial = None

    def before_train(self, runner):
        self.initial = {
            k: v.detach().cpu().clone()
            for k, v in unwrap_model(runner.model).state_dict().items()
        }

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        self.seen += [s.img_path for s in data_batch['data_samples']]

    def after_train(self, runner):
        model = runner.model
        info = dict(
            wrapper=type(model).__name__,
            device_ids=getattr(model, 'device_ids', None),
            backend=torch_dist.get_backend()
            if torch_dist.is_initialized() else None,
            world_size=torch_dist.get_world_size()
            if torch_dist.is_initialized() else 1,
            seen=self.seen,
            iter=runner.iter,
            initial=self.initial,
            final={
                k: v.detach().cpu().clone()
                for k, v in unwrap_model(model).state_dict().items()
            },
            requires_grad={
                n: p.requires_grad
                for n, p in unwrap_model(model).named_parameters()
            },
            optim_wrapper=type(runner.optim_wrapper).__name__,
        )
        torch.save(info, os.path.join(runner.work_dir,
                                      f'rank{get_rank()}.pth'))


@HOOKS.register_module()
class CrashAfterIter(Hook):
    """Raises after iteration ``n`` when the env variable is set (a kill)."""

    def __init__(self, n, env='EOMT_TEST_CRASH'):
        self.n = n
        self.env = env

    def after_train_iter(self, runner, batch_idx, data_batch=None,
                         outputs=None):
        if os.environ.get(self.env) == '1' and runner.iter + 1 == self.n:
            raise RuntimeError(f'simulated crash after iter {self.n}')
'''


def _config_src(data_root: Path, max_iters: int, ckpt_interval: int,
                crash_after: int) -> str:
    return textwrap.dedent(f'''
        default_scope = 'mmseg'
        custom_imports = dict(
            imports=['eomt_mm', '{HELPER_MODULE}'], allow_failed_imports=False)
        crop = (32, 32)
        model = dict(
            type='EncoderDecoder',
            data_preprocessor=dict(
                type='SegDataPreProcessor',
                mean=[123.675, 116.28, 103.53],
                std=[58.395, 57.12, 57.375],
                bgr_to_rgb=True,
                pad_val=0,
                seg_pad_val=255,
                size=crop),
            backbone=dict(
                type='mmpretrain.VisionTransformer',
                arch=dict(
                    embed_dims=32, num_layers=2, num_heads=2,
                    feedforward_channels=64),
                img_size=32,
                patch_size=8,
                out_type='featmap',
                frozen_stages=1),
            decode_head=dict(
                type='FCNHead',
                in_channels=32,
                channels=16,
                num_convs=1,
                concat_input=False,
                dropout_ratio=0.0,
                num_classes=3,
                norm_cfg=None,
                align_corners=False,
                loss_decode=dict(type='CrossEntropyLoss', loss_weight=1.0)),
            train_cfg=dict(),
            test_cfg=dict(mode='whole'))
        metainfo = dict(classes=('sky', 'road', 'car'),
                        palette=[[70, 130, 180], [128, 64, 128], [0, 0, 142]])
        dataset = dict(
            type='BaseSegDataset',
            data_root={str(data_root)!r},
            data_prefix=dict(img_path='img', seg_map_path='ann'),
            img_suffix='.png',
            seg_map_suffix='.png',
            metainfo=metainfo)
        train_dataloader = dict(
            batch_size=2,
            num_workers=0,
            sampler=dict(type='InfiniteSampler', shuffle=True),
            dataset=dict(
                **dataset,
                pipeline=[
                    dict(type='LoadImageFromFile'),
                    dict(type='LoadAnnotations'),
                    dict(type='PackSegInputs')
                ]))
        test_dataloader = dict(
            batch_size=1,
            num_workers=0,
            sampler=dict(type='DefaultSampler', shuffle=False),
            dataset=dict(
                **dataset,
                pipeline=[
                    dict(type='LoadImageFromFile'),
                    dict(type='LoadAnnotations'),
                    dict(type='PackSegInputs')
                ]))
        test_evaluator = dict(type='IoUMetric', iou_metrics=['mIoU'])
        test_cfg = dict(type='TestLoop')
        optim_wrapper = dict(
            type='OptimWrapper',
            optimizer=dict(type='SGD', lr=0.05, momentum=0.9,
                           weight_decay=1e-4))
        param_scheduler = [
            dict(type='PolyLR', eta_min=1e-4, power=0.9, by_epoch=False)
        ]
        train_cfg = dict(
            type='IterBasedTrainLoop', max_iters={max_iters},
            val_interval=1000)
        default_hooks = dict(
            timer=dict(type='IterTimerHook'),
            logger=dict(type='LoggerHook', interval=1,
                        log_metric_by_epoch=False),
            param_scheduler=dict(type='ParamSchedulerHook'),
            checkpoint=dict(type='CheckpointHook', by_epoch=False,
                            interval={ckpt_interval}),
            sampler_seed=dict(type='DistSamplerSeedHook'),
            visualization=dict(type='SegVisualizationHook'))
        custom_hooks = [
            dict(type='DumpRankState'),
            dict(type='CrashAfterIter', n={crash_after}),
        ]
        env_cfg = dict(
            cudnn_benchmark=False,
            mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
            dist_cfg=dict(backend='nccl'))
        vis_backends = [dict(type='LocalVisBackend')]
        # No fixed name: the tests run several runners in one process and
        # mmengine would hand every one the first instance of that name.
        visualizer = dict(type='SegLocalVisualizer', vis_backends=vis_backends)
        log_processor = dict(by_epoch=False)
        log_level = 'INFO'
        load_from = None
        resume = False
        randomness = dict(seed=0)
        ''')


def write_tiny_setup(root: Path, max_iters: int = 4, ckpt_interval: int = 2,
                     crash_after: int = 3) -> Path:
    """Write data, the hooks module and the config under ``root``.

    Args:
        root: Folder to write into (``root/data``, ``root/<helper>.py``,
            ``root/tiny_seg.py``). Put ``root`` on PYTHONPATH / sys.path.
        max_iters: Training length.
        ckpt_interval: Checkpoint every N iterations.
        crash_after: ``CrashAfterIter`` raises after this iteration when
            ``EOMT_TEST_CRASH=1``.

    Returns:
        Path of the config file.
    """
    rng = np.random.default_rng(0)
    data = root / 'data'
    (data / 'img').mkdir(parents=True, exist_ok=True)
    (data / 'ann').mkdir(parents=True, exist_ok=True)
    colors = np.array([[180, 130, 70], [128, 64, 128], [142, 0, 0]],
                      dtype=np.float64)  # BGR for cv2
    for i in range(8):
        label = np.zeros((32, 32), np.uint8)
        label[16 + rng.integers(-4, 5):, :] = 1  # road below a horizon
        y, x = rng.integers(4, 24, size=2)
        label[y:y + 8, x:x + 8] = 2  # a car
        img = colors[label] + rng.normal(0, 12, (32, 32, 3))
        cv2.imwrite(str(data / 'img' / f'{i:03d}.png'),
                    np.clip(img, 0, 255).astype(np.uint8))
        cv2.imwrite(str(data / 'ann' / f'{i:03d}.png'), label)
    (root / f'{HELPER_MODULE}.py').write_text(_HOOKS_SRC)
    cfg = root / 'tiny_seg.py'
    cfg.write_text(_config_src(data, max_iters, ckpt_interval, crash_after))
    return cfg


def subprocess_env(root: Path) -> dict:
    """Environment for running the tools on CPU with ``root`` importable."""
    env = dict(os.environ)
    repo = str(Path(__file__).resolve().parents[1])
    env['PYTHONPATH'] = os.pathsep.join(
        p for p in (str(root), repo, env.get('PYTHONPATH', '')) if p)
    env['CUDA_VISIBLE_DEVICES'] = ''
    env['OMP_NUM_THREADS'] = '1'
    env.pop('EOMT_TEST_CRASH', None)
    return env
