"""Anomaly benchmark datasets on tiny generated folders in each layout."""
import glob
import os.path as osp

import cv2
import numpy as np
import pytest
from mmengine.config import Config
from mmengine.registry import init_default_scope
from mmseg.registry import DATASETS, TRANSFORMS

from eomt_mm.anomaly.label_remap import build_label_lut

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
PIPELINE = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='RemapAnomalyLabels'),
    dict(type='PackSegInputs'),
]


@pytest.fixture(autouse=True)
def _mmseg_scope():
    # Dataset pipelines resolve 'LoadAnnotations' etc. in the default scope, as configs do.
    init_default_scope('mmseg')


def _write(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), array), path


def _image(seed):
    return np.random.default_rng(seed).integers(0, 255, (8, 10, 3), dtype=np.uint8)


def _raw_label(values, seed):
    rng = np.random.default_rng(seed)
    label = rng.choice(np.asarray(values, np.uint8), size=(8, 10))
    label[0, : len(values)] = values  # every value present at least once
    return label


def _make_common(root, exts=('png', 'jpg', 'webp'), values=(0, 1, 255)):
    labels = {}
    for i, ext in enumerate(exts):
        _write(root / 'images' / f'frame_{i}.{ext}', _image(i))
        labels[f'frame_{i}'] = _raw_label(values, i)
        _write(root / 'labels_masks' / f'frame_{i}.png', labels[f'frame_{i}'])
    return labels


def _gts(dataset):
    return [dataset[i]['data_samples'].gt_sem_seg.data.numpy()[0] for i in range(len(dataset))]


@pytest.mark.parametrize('dataset_type', ['AnomalyFolderDataset', 'RoadAnomaly21Dataset',
                                          'RoadObstacle21Dataset', 'FishyscapesStaticDataset',
                                          'FishyscapesLostFoundDataset'])
def test_common_layout_all_extensions(tmp_path, dataset_type):
    labels = _make_common(tmp_path)
    ds = DATASETS.build(dict(type=dataset_type, data_root=str(tmp_path), pipeline=PIPELINE))
    assert len(ds) == 3
    names = [osp.basename(ds.get_data_info(i)['img_path']) for i in range(3)]
    assert names == ['frame_0.png', 'frame_1.jpg', 'frame_2.webp']
    for i, gt in enumerate(_gts(ds)):
        np.testing.assert_array_equal(gt, labels[f'frame_{i}'])
    sample = ds[1]
    assert sample['inputs'].shape == (3, 8, 10)
    assert ds.metainfo['classes'] == ('inlier', 'anomaly')


def test_road_anomaly_maps_2_to_1(tmp_path):
    labels = _make_common(tmp_path, exts=('jpg', 'png'), values=(0, 2))
    ds = DATASETS.build(dict(type='RoadAnomalyDataset', data_root=str(tmp_path),
                             pipeline=PIPELINE))
    for i, gt in enumerate(_gts(ds)):
        np.testing.assert_array_equal(gt, np.where(labels[f'frame_{i}'] == 2, 1, 0))
    # A 2 in a dataset that does not store anomalies as 2 is an error naming the file.
    ds21 = DATASETS.build(dict(type='RoadAnomaly21Dataset', data_root=str(tmp_path),
                               pipeline=PIPELINE))
    with pytest.raises(ValueError, match=r'frame_0\.png has unexpected values \[2\]'):
        ds21[0]


def test_smiyc_layout(tmp_path):
    root = tmp_path / 'dataset_AnomalyTrack'
    labels = {}
    for i in range(2):
        _write(root / 'images' / f'validation000{i}.jpg', _image(i))
        labels[i] = _raw_label((0, 1, 255), i)
        _write(root / 'labels_masks' / f'validation000{i}_labels_semantic.png', labels[i])
        # The colour visualisation shipped next to the labels is not a label.
        _write(root / 'labels_masks' / f'validation000{i}_labels_semantic_color.png', _image(9))
    _write(root / 'images' / 'test0000.jpg', _image(5))  # hidden-label test image: skipped
    ds = DATASETS.build(dict(type='SMIYCDataset', data_root=str(root), pipeline=PIPELINE))
    assert [osp.basename(ds.get_data_info(i)['img_path']) for i in range(len(ds))] == [
        'validation0000.jpg', 'validation0001.jpg']
    for i, gt in enumerate(_gts(ds)):
        np.testing.assert_array_equal(gt, labels[i])
    obstacle = tmp_path / 'dataset_ObstacleTrack'
    _write(obstacle / 'images' / 'validation_1.webp', _image(3))
    _write(obstacle / 'labels_masks' / 'validation_1_labels_semantic.png', labels[0])
    ds = DATASETS.build(dict(type='SMIYCDataset', data_root=str(obstacle), pipeline=PIPELINE))
    np.testing.assert_array_equal(_gts(ds)[0], labels[0])


def test_lost_and_found_layout_and_remap(tmp_path):
    raw = {}
    for city, frame in (('01_Hanns_Klemm_Str_45', '000000_000120'), ('04_Maurener_Weg_8',
                                                                      '000003_000090')):
        name = f'{city}_{frame}'
        _write(tmp_path / 'leftImg8bit' / 'test' / city / f'{name}_leftImg8bit.png', _image(1))
        raw[name] = _raw_label((0, 1, 2, 37, 200), len(raw))
        _write(tmp_path / 'gtCoarse' / 'test' / city / f'{name}_gtCoarse_labelIds.png', raw[name])
        # Other gtCoarse products in the same folder must not confuse the pairing.
        _write(tmp_path / 'gtCoarse' / 'test' / city / f'{name}_gtCoarse_color.png', _image(2))
    ds = DATASETS.build(dict(type='LostAndFoundDataset', data_root=str(tmp_path),
                             pipeline=PIPELINE))
    assert len(ds) == 2
    for (name, label), gt in zip(sorted(raw.items()), _gts(ds)):
        expected = np.select([label == 0, label == 1], [255, 0], default=1)
        np.testing.assert_array_equal(gt, expected)
    bad = raw['04_Maurener_Weg_8_000003_000090'].copy()
    bad[0, 0] = 201
    path = (tmp_path / 'gtCoarse' / 'test' / '04_Maurener_Weg_8' /
            '04_Maurener_Weg_8_000003_000090_gtCoarse_labelIds.png')
    _write(path, bad)
    with pytest.raises(ValueError, match=r'000090_gtCoarse_labelIds\.png has unexpected values '
                                         r'\[201\]; this dataset allows 0\.\.200'):
        ds[1]


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match='image folder .*images.* does not exist'):
        DATASETS.build(dict(type='RoadAnomaly21Dataset', data_root=str(tmp_path / 'nowhere')))
    (tmp_path / 'images').mkdir()
    with pytest.raises(FileNotFoundError, match='label folder .*labels_masks'):
        DATASETS.build(dict(type='RoadAnomaly21Dataset', data_root=str(tmp_path)))
    (tmp_path / 'labels_masks').mkdir()
    with pytest.raises(FileNotFoundError, match='no image with suffix'):
        DATASETS.build(dict(type='RoadAnomaly21Dataset', data_root=str(tmp_path)))
    _make_common(tmp_path, exts=('png',))
    _write(tmp_path / 'images' / 'orphan.webp', _image(0))
    with pytest.raises(FileNotFoundError, match=r'orphan\.webp has no label file .*orphan\.png'):
        DATASETS.build(dict(type='RoadAnomaly21Dataset', data_root=str(tmp_path)))


def test_remap_transform_direct():
    t = TRANSFORMS.build(dict(type='RemapAnomalyLabels', mapping={0: 255, 1: 0},
                              ranges=[(2, 200, 1)]))
    seg = np.array([[0, 1, 2], [100, 200, 1]], np.uint8)
    out = t.transform(dict(gt_seg_map=seg, seg_map_path='x.png'))['gt_seg_map']
    np.testing.assert_array_equal(out, [[255, 0, 1], [1, 1, 0]])
    assert out.dtype == np.uint8
    with pytest.raises(KeyError, match='no mapping for y.png'):
        TRANSFORMS.build(dict(type='RemapAnomalyLabels')).transform(
            dict(gt_seg_map=seg, seg_map_path='y.png'))
    with pytest.raises(ValueError, match='single-channel'):
        t.transform(dict(gt_seg_map=np.zeros((2, 2, 3), np.uint8), seg_map_path='c.png'))
    with pytest.raises(ValueError, match='0 <= low'):
        build_label_lut(ranges=[(5, 2, 1)])


@pytest.mark.parametrize('cfg_path', sorted(glob.glob(
    osp.join(ROOT, 'configs', '_base_', 'datasets', 'anomaly_*.py'))))
def test_dataset_configs_build(tmp_path, cfg_path):
    cfg = Config.fromfile(cfg_path)
    assert cfg.test_evaluator.type == 'AnomalyMetric'
    ds_cfg = cfg.test_dataloader.dataset
    if ds_cfg.type == 'LostAndFoundDataset':
        name = 'c_000000_000010'
        _write(tmp_path / 'leftImg8bit' / 'test' / 'c' / f'{name}_leftImg8bit.png', _image(0))
        _write(tmp_path / 'gtCoarse' / 'test' / 'c' / f'{name}_gtCoarse_labelIds.png',
               _raw_label((0, 1, 5), 0))
    elif ds_cfg.type == 'SMIYCDataset':
        _write(tmp_path / 'images' / 'validation0000.jpg', _image(0))
        _write(tmp_path / 'labels_masks' / 'validation0000_labels_semantic.png',
               _raw_label((0, 1, 255), 0))
    else:
        _make_common(tmp_path, exts=('png',), values=(0, 1))
    ds_cfg.data_root = str(tmp_path)
    ds = DATASETS.build(ds_cfg)
    gt = ds[0]['data_samples'].gt_sem_seg.data.numpy()
    assert set(np.unique(gt).tolist()) <= {0, 1, 255} and 1 in gt
    # The Resize keeps the label at its original resolution (scores are compared there).
    assert gt.shape == (1, 8, 10)
