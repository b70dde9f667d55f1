"""Anomaly benchmark datasets on tiny generated folders in each layout."""
import glob
import os.path as osp

import cv2
import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.registry import init_default_scope
from mmengine.structures import PixelData
from mmseg.registry import DATASETS, TRANSFORMS

from eomt_mm.anomaly.datasets import LOSTANDFOUND_SUBSETS
from eomt_mm.anomaly.label_remap import build_label_lut
from eomt_mm.anomaly.metric import AnomalyMetric

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
PIPELINE = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='RemapAnomalyLabels'),
    dict(type='PackSegInputs'),
]
# Images-only splits (hidden labels), as configs/_base_/datasets/common_anomaly_benchmark.py's
# test_unlabelled_pipeline.
UNLABELLED_PIPELINE = [dict(type='LoadImageFromFile'), dict(type='PackSegInputs')]


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
    for city, frame in (('01_Hanns_Klemm_Str_45', '000000_000120'),
                        ('04_Maurener_Weg_8', '000003_000090')):
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
    ds_cfg.data_root = str(tmp_path)
    if ds_cfg.type == 'SMIYCDataset' and ds_cfg.get('split') == 'test':
        # The test server's frames: images only, named as the benchmark's.
        names = {'.jpg': ['airplane0000'], '.webp': ['curvy-street_1', 'driveway_2']}
        for name in names[ds_cfg.img_suffixes[0]] + ['validation0000']:
            _write(tmp_path / 'images' / f'{name}{ds_cfg.img_suffixes[0]}', _image(0))
        with pytest.raises(ValueError, match=f'but this split has {ds_cfg.expected_frames}'):
            DATASETS.build(ds_cfg)  # the benchmark's split size guards a partial download
        ds_cfg.expected_frames = len(names[ds_cfg.img_suffixes[0]])
        ds = DATASETS.build(ds_cfg)
        assert [ds.get_data_info(i)['frame_name'] for i in range(len(ds))] == \
            names[ds_cfg.img_suffixes[0]]
        assert 'gt_sem_seg' not in ds[0]['data_samples'] and cfg.smiyc_submission_name
        assert ds[0]['data_samples'].ori_shape == (8, 10)
        return
    if ds_cfg.get('subset'):  # a benchmark subset: positions in the whole LostAndFound split
        _write(tmp_path / 'leftImg8bit' / 'test' / 'c' / 'c_000000_000010_leftImg8bit.png',
               _image(0))
        _write(tmp_path / 'gtCoarse' / 'test' / 'c' / 'c_000000_000010_gtCoarse_labelIds.png',
               _raw_label((0, 1, 5), 0))
        with pytest.raises(ValueError, match='needs the complete LostAndFound split'):
            DATASETS.build(ds_cfg)
        return
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
    ds = DATASETS.build(ds_cfg)
    gt = ds[0]['data_samples'].gt_sem_seg.data.numpy()
    assert set(np.unique(gt).tolist()) <= {0, 1, 255} and 1 in gt
    # The Resize keeps the label at its original resolution (scores are compared there).
    assert gt.shape == (1, 8, 10)


def _frame_names(dataset):
    return [dataset.get_data_info(i)['frame_name'] for i in range(len(dataset))]


def test_smiyc_test_split_is_images_only(tmp_path):
    root = tmp_path / 'dataset_AnomalyTrack'
    for i in range(2):
        _write(root / 'images' / f'validation000{i}.jpg', _image(i))
        _write(root / 'labels_masks' / f'validation000{i}_labels_semantic.png',
               _raw_label((0, 1, 255), i))
    sizes = {'airplane0000': (8, 10), 'animals0001': (6, 12), 'zebra0002': (9, 7)}
    for name, (height, width) in sizes.items():  # hidden-label frames: no label file
        _write(root / 'images' / f'{name}.jpg', np.full((height, width, 3), 7, np.uint8))
    test = DATASETS.build(dict(type='SMIYCDataset', data_root=str(root), split='test',
                               pipeline=UNLABELLED_PIPELINE))
    assert not test.labelled and _frame_names(test) == sorted(sizes)
    for i, name in enumerate(sorted(sizes)):
        sample = test[i]
        assert 'gt_sem_seg' not in sample['data_samples']
        assert sample['data_samples'].metainfo['seg_map_path'] is None
        assert tuple(sample['inputs'].shape) == (3, *sizes[name])
    # Validation and test split the folder between them.
    validation = DATASETS.build(dict(type='SMIYCDataset', data_root=str(root), pipeline=PIPELINE))
    assert validation.labelled and _frame_names(validation) == ['validation0000', 'validation0001']
    # The test split needs no label folder; the labelled split stops, naming it and the fix.
    for path in (root / 'labels_masks').iterdir():
        path.unlink()
    (root / 'labels_masks').rmdir()
    assert len(DATASETS.build(dict(type='SMIYCDataset', data_root=str(root), split='test',
                                   pipeline=UNLABELLED_PIPELINE))) == 3
    with pytest.raises(FileNotFoundError, match=r'label folder .*labels_masks.* does not exist '
                                                r'.*labelled=False'):
        DATASETS.build(dict(type='SMIYCDataset', data_root=str(root), pipeline=PIPELINE))
    with pytest.raises(ValueError, match='split must be one of'):
        DATASETS.build(dict(type='SMIYCDataset', data_root=str(root), split='train'))
    with pytest.raises(ValueError, match='the split decides'):
        DATASETS.build(dict(type='SMIYCDataset', data_root=str(root), labelled=False))


def test_smiyc_obstacle_test_scenes_and_size(tmp_path):
    root = tmp_path / 'dataset_ObstacleTrack'
    for name in ('curvy-street_3', 'driveway_1', 'snowstorm1_10', 'validation_1', 'unlisted_2'):
        _write(root / 'images' / f'{name}.webp', _image(1))
    _write(root / 'images' / 'curvy-street_4.png', _image(2))  # not the benchmark's format
    cfg = dict(type='SMIYCDataset', data_root=str(root), split='test', img_suffixes=['.webp'],
               scenes=['curvy-street', 'driveway', 'snowstorm1'], pipeline=UNLABELLED_PIPELINE)
    assert _frame_names(DATASETS.build(cfg)) == ['curvy-street_3', 'driveway_1', 'snowstorm1_10']
    with pytest.raises(ValueError, match=r"found 3 frames not starting with \['validation'\] of "
                                         r"scenes .* but this split has 4 \(expected_frames\)"):
        DATASETS.build(dict(cfg, expected_frames=4))


def test_images_only_split_and_the_metric(tmp_path):
    _write(tmp_path / 'images' / 'a.png', _image(0))  # no labels_masks folder at all
    with pytest.raises(ValueError, match=r"images-only .*\['LoadAnnotations', "
                                         r"'RemapAnomalyLabels'\].*test_unlabelled_pipeline"):
        DATASETS.build(dict(type='AnomalyFolderDataset', data_root=str(tmp_path),
                            labelled=False, pipeline=PIPELINE))
    ds = DATASETS.build(dict(type='AnomalyFolderDataset', data_root=str(tmp_path),
                             labelled=False, pipeline=UNLABELLED_PIPELINE))
    assert _frame_names(ds) == ['a']
    sample = ds[0]['data_samples']
    sample.anomaly_scores = PixelData(msp=torch.rand(1, 8, 10))
    # AnomalyMetric refuses frames without labels (no figures over part of a split).
    metric = AnomalyMetric(score_names=['msp'])
    for form in (sample.to_dict(), sample):
        with pytest.raises(ValueError, match=r'frame .*a\.png has no label \(gt_sem_seg\).*'
                                             r'--smiyc-submission'):
            metric.process({}, [form])
        assert metric.results == []
    # Frames are named by file stem, as the benchmark's files: two images of one stem clash.
    _write(tmp_path / 'images' / 'a.jpg', _image(1))
    with pytest.raises(ValueError, match="the same frame name 'a'"):
        DATASETS.build(dict(type='AnomalyFolderDataset', data_root=str(tmp_path),
                            labelled=False, pipeline=UNLABELLED_PIPELINE))


def _lost_and_found_test_split(root):
    """1203 images named as LostAndFound's test frames: the 800 sorted first hold every
    position the benchmark removes, then 143 frames of its excluded known-object sequences."""
    groups = [('01_Hanns_Klemm_Str_45', seq, 160) for seq in range(5)]
    excluded = [('01_Hanns_Klemm_Str_45', 6, 40), ('01_Hanns_Klemm_Str_45', 7, 30),
                ('10_Schlossberg_9', 4, 33), ('15_Rechbergstr_Deckenpfronn', 0, 40)]
    others = [('01_Hanns_Klemm_Str_45', 8, 100), ('10_Schlossberg_9', 5, 80),
              ('16_Wolfsburgstr', 0, 80)]
    png = cv2.imencode('.png', _image(0))[1].tobytes()
    names = {}
    for kind, group in (('first', groups), ('excluded', excluded), ('other', others)):
        names[kind] = []
        for city, seq, count in group:
            folder = root / 'leftImg8bit' / 'test' / city
            folder.mkdir(parents=True, exist_ok=True)
            for time in range(count):
                name = f'{city}_{seq:06d}_{time:06d}'
                (folder / f'{name}_leftImg8bit.png').write_bytes(png)
                names[kind].append(name)
    assert sum(map(len, names.values())) == 1203
    return names


def test_lost_and_found_benchmark_subsets(tmp_path):
    names = _lost_and_found_test_split(tmp_path)
    cfg = dict(type='LostAndFoundDataset', data_root=str(tmp_path), labelled=False,
               pipeline=UNLABELLED_PIPELINE)
    removed = [names['first'][i] for i in LOSTANDFOUND_SUBSETS['LostAndFound-testValid']
               ['exclude_indices']]
    assert len(removed) == 17 and names['first'][17] in removed
    assert names['first'][16] not in removed and names['first'][793] in removed
    valid = _frame_names(DATASETS.build(dict(cfg, subset='LostAndFound-testValid')))
    assert len(valid) == 1186 and not set(removed) & set(valid)
    assert set(names['excluded']) <= set(valid)
    no_known = _frame_names(DATASETS.build(dict(cfg, subset='LostAndFound-testNoKnown')))
    assert len(no_known) == 1043
    assert set(no_known) == set(valid) - set(names['excluded'])
    assert no_known == sorted(no_known)  # the benchmark's order: by frame id
    assert len(DATASETS.build(cfg)) == 1203  # no subset: the whole split, named without suffix
    with pytest.raises(ValueError, match="part of the 'train' split, not 'test'"):
        DATASETS.build(dict(cfg, subset='LostAndFound-trainValid', split='test'))
    with pytest.raises(FileNotFoundError, match=r'leftImg8bit/train.* does not exist'):
        DATASETS.build(dict(cfg, subset='LostAndFound-trainValid'))
    with pytest.raises(ValueError, match="unknown LostAndFound subset 'NoKnown'"):
        DATASETS.build(dict(cfg, subset='NoKnown'))
    city = names['other'][-1].rsplit('_', 2)[0]
    (tmp_path / 'leftImg8bit' / 'test' / city / f'{names["other"][-1]}_leftImg8bit.png').unlink()
    with pytest.raises(ValueError, match=r'whole test split \(1203 frames\), but .* holds 1202'):
        DATASETS.build(dict(cfg, subset='LostAndFound-testNoKnown'))
