"""Bad data that used to pass silently or fail far from its cause, refused at load time."""
import cv2
import numpy as np
import pytest
import torch
from mmseg.registry import MODELS, TRANSFORMS

import eomt_mm  # noqa: F401  (registers the transforms)
from eomt_mm.datasets.transforms.checked_loading import LabelMismatchError


def _write(tmp_path, name, array):
    path = str(tmp_path / name)
    assert cv2.imwrite(path, array)
    return path


def _load(img_path, seg_path, **kw):
    results = dict(img_path=img_path, seg_map_path=seg_path, reduce_zero_label=False,
                   seg_fields=[])
    results = TRANSFORMS.build(dict(type='LoadImageFromFileChecked')).transform(results)
    return TRANSFORMS.build(dict(type='LoadAnnotationsChecked', **kw)).transform(results)


def test_label_of_another_size_names_both_files(tmp_path):
    img = _write(tmp_path, 'a.png', np.zeros((32, 64, 3), np.uint8))
    # Same aspect, half the size: RandomResize would have stretched it silently.
    seg = _write(tmp_path, 'a_label.png', np.zeros((16, 32), np.uint8))
    with pytest.raises(LabelMismatchError) as err:
        _load(img, seg, num_classes=19)
    msg = str(err.value)
    assert 'a_label.png' in msg and 'a.png' in msg and '16x32' in msg and '32x64' in msg


def test_label_values_outside_the_classes_name_the_file_and_values(tmp_path):
    img = _write(tmp_path, 'b.png', np.zeros((8, 8, 3), np.uint8))
    label = np.zeros((8, 8), np.uint8)
    label[0, 0], label[1, 1], label[2, 2] = 200, 255, 18
    seg = _write(tmp_path, 'b_label.png', label)
    with pytest.raises(LabelMismatchError, match=r"b_label\.png.*\[200\].*0\.\.18"):
        _load(img, seg, num_classes=19)
    out = _load(img, seg, num_classes=201)  # 200 is a class there; 255 is ignore
    assert out['gt_seg_map'][0, 0] == 200
    assert _load(img, seg)['gt_seg_map'].shape == (8, 8)  # no num_classes: no value check


def test_shipped_semantic_dataset_configs_check_label_values():
    from pathlib import Path

    from mmengine import Config
    root = Path(__file__).resolve().parents[1] / 'configs' / '_base_' / 'datasets'
    for name, classes in (('cityscapes_1024x1024.py', 19), ('cityscapes_640x640.py', 19),
                          ('demo_roads.py', 19), ('ade20k_512x512.py', 150)):
        cfg = Config.fromfile(str(root / name))
        for loader in ('train_dataloader', 'val_dataloader'):
            steps = [t for t in cfg[loader].dataset.pipeline
                     if t['type'] == 'LoadAnnotationsChecked']
            assert steps and all(t.get('num_classes') == classes for t in steps), (name, loader)


def _tiny_eomt():
    return MODELS.build(dict(
        type='EoMT',
        backbone=dict(type='DINOv2', arch=dict(embed_dims=32, num_layers=2, num_heads=2,
                                               feedforward_channels=64),
                      img_size=32, patch_size=16, num_register_tokens=0),
        decoder=dict(type='EoMTDecoder', num_classes=3, num_queries=4, num_blocks=1,
                     num_points=16)))


def test_patch_size_error_quotes_the_key_that_works_in_each_mode():
    model = _tiny_eomt()
    model.eval()
    with pytest.raises(ValueError, match=r'data_preprocessor\.test_cfg=dict\(size_divisor=16\)'):
        with torch.no_grad():
            model.predict(torch.randn(1, 3, 40, 32))
    model.train()
    with pytest.raises(ValueError, match=r'data_preprocessor\.size'):
        model.run_network(torch.randn(1, 3, 40, 32), masked_attn=False)
