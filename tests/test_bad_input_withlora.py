"""``WithLoRA`` through ``tools/train.py`` with mmseg's own model config (issue: the Runner
passes the top-level ``data_preprocessor`` into the model config, which ``WithLoRA``
rejected with ``TypeError: WithLoRA() got an unexpected keyword argument
'data_preprocessor'``)."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from mmengine.registry import DefaultScope
from mmseg.registry import MODELS

from _demo_tools_common import REPO, make_demo_data
from eomt_mm.engine.checkpoint import load_checkpoint_weights_only
from eomt_mm.lora import LoRALinear, WithLoRA

ITERS = 3


def _tiny_upernet_config(path: Path, data_root: Path) -> Path:
    """mmseg's UperNet-ViT base config, shrunk, wrapped in WithLoRA by `_base_` merging."""
    path.write_text(textwrap.dedent(f"""
        _base_ = [
            'mmseg::_base_/models/upernet_vit-b16_ln_mln.py',
            'mmseg::_base_/default_runtime.py',
            'mmseg::_base_/schedules/schedule_20k.py',
            {str(REPO / 'configs/_base_/datasets/demo_roads.py')!r},
        ]
        custom_imports = dict(imports=['eomt_mm'], allow_failed_imports=False)
        norm_cfg = dict(type='BN', requires_grad=True)
        width = 32
        # As mmseg's own configs do (e.g. its upernet_vit-b16_mln 512x512 ADE20K config).
        crop_size = (128, 128)
        data_preprocessor = dict(size=crop_size)
        model = dict(
            type='WithLoRA',
            model=dict(type='EncoderDecoder'),
            data_preprocessor=data_preprocessor,
            pretrained=None,
            backbone=dict(img_size=(128, 128), embed_dims=width, num_layers=4, num_heads=2,
                          out_indices=(0, 1, 2, 3)),
            neck=dict(in_channels=[width] * 4, out_channels=width),
            decode_head=dict(in_channels=[width] * 4, channels=16, norm_cfg=norm_cfg),
            auxiliary_head=dict(in_channels=width, channels=16, norm_cfg=norm_cfg),
            lora_config=dict(rank=4, lora_alpha=8, target_modules=['fc1', 'fc2']))
        train_dataloader = dict(batch_size=2, dataset=dict(data_root={str(data_root)!r}))
        val_dataloader = dict(dataset=dict(data_root={str(data_root)!r}))
        test_dataloader = val_dataloader
        optim_wrapper = dict(optimizer=dict(lr=1e-2))
        train_cfg = dict(max_iters={ITERS}, val_interval={ITERS})
        param_scheduler = [dict(type='PolyLR', power=0.9, eta_min=0.0, begin=0,
                                end={ITERS}, by_epoch=False)]
        default_hooks = dict(logger=dict(interval=1),
                             checkpoint=dict(interval={ITERS}))
        randomness = dict(seed=0)
        """))
    return path


def test_with_lora_forwards_runner_keys_to_the_inner_model():
    pre = dict(type='SegDataPreProcessor', mean=[1.0, 2.0, 3.0], std=[1.0, 1.0, 1.0])
    inner = dict(type='EncoderDecoder',
                 backbone=dict(type='VisionTransformer', img_size=(32, 32), embed_dims=16,
                               num_layers=2, num_heads=2, out_indices=(1, )),
                 decode_head=dict(type='FCNHead', in_channels=16, channels=8, num_convs=1,
                                  num_classes=3))
    with DefaultScope.overwrite_default_scope('mmseg'):
        # What Runner.build_model does: setdefault('data_preprocessor', cfg.data_preprocessor).
        model = MODELS.build(dict(type='WithLoRA', model=inner, data_preprocessor=pre,
                                  lora_config=dict(rank=2, target_modules=['fc1'])))
        assert model.data_preprocessor.mean.flatten().tolist() == [1.0, 2.0, 3.0]
        assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 2
        # The inner model's own preprocessor wins, as in Runner.build_model.
        own = dict(inner, data_preprocessor=dict(pre, mean=[7.0, 8.0, 9.0]))
        model = WithLoRA(own, dict(rank=2, target_modules=['fc1']), data_preprocessor=pre)
        assert model.data_preprocessor.mean.flatten().tolist() == [7.0, 8.0, 9.0]
        # Keys `_base_` merged next to type='WithLoRA' go to the inner model; its own win.
        model = WithLoRA(dict(type='EncoderDecoder', backbone=dict(embed_dims=24)),
                         dict(rank=2, target_modules=['fc2']),
                         backbone=dict(inner['backbone'], num_heads=3),
                         decode_head=dict(inner['decode_head'], in_channels=24))
        assert model.backbone.cls_token.shape[-1] == 24
    with pytest.raises(TypeError, match=r"already built .*\['backbone'\]"):
        WithLoRA(torch.nn.Linear(2, 2), None, backbone=dict(embed_dims=3))


def test_train_tool_with_lora_on_mmseg_upernet_base_config(tmp_path):
    data_root = make_demo_data(tmp_path / 'data')
    config = _tiny_upernet_config(tmp_path / 'upernet_lora.py', data_root)
    work_dir = tmp_path / 'work'
    env = dict(os.environ, CUDA_VISIBLE_DEVICES='', OMP_NUM_THREADS='2')
    proc = subprocess.run(
        [sys.executable, str(REPO / 'tools' / 'train.py'), str(config), '--work-dir',
         str(work_dir)], cwd=str(tmp_path), env=env, capture_output=True, text=True,
        timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    checkpoint = load_checkpoint_weights_only(str(work_dir / f'iter_{ITERS}.pth'))
    state = checkpoint['state_dict']
    lora_b = [k for k in state if k.endswith('lora_B')]
    # 4 blocks x (fc1, fc2), on mmseg's VisionTransformer FFN.
    assert len(lora_b) == 8 and 'backbone.layers.0.ffn.layers.0.0.lora_B' in lora_b
    # lora_B starts at zero: the adapter trained.
    assert all(state[k].abs().max() > 0 for k in lora_b)
    # The run itself needs the preprocessor's size=crop_size (stack_batch asserts it).
    assert 'mIoU' in proc.stdout + proc.stderr
