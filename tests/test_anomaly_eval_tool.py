"""tools/eval_anomaly.py end to end: tiny EoMT checkpoint, two tiny benchmark folders, one table."""
import csv
import importlib.util
import json
import os.path as osp

import cv2
import numpy as np
import pytest
import torch
from mmengine.registry import init_default_scope
from mmseg.registry import MODELS

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
HAS_H5PY = importlib.util.find_spec('h5py') is not None

MODEL_CFG = """
default_scope = 'mmseg'
custom_imports = dict(imports=['eomt_mm'], allow_failed_imports=False)
model = dict(
    type='EoMT',
    data_preprocessor=dict(type='SegDataPreProcessor', mean=[123.675, 116.28, 103.53],
                           std=[58.395, 57.12, 57.375], bgr_to_rgb=True, pad_val=0,
                           seg_pad_val=255, size_divisor=8),
    backbone=dict(type='DINOv2', arch=dict(embed_dims=32, num_layers=2, num_heads=2,
                                           feedforward_channels=64),
                  img_size=32, patch_size=8, num_register_tokens=0),
    decoder=dict(type='EoMTDecoder', num_classes=3, num_queries=4, num_blocks=1, num_points=16),
    test_cfg=dict(mode='whole'))
env_cfg = dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
               dist_cfg=dict(backend='gloo'))
default_hooks = dict(logger=dict(type='LoggerHook', interval=1))
log_level = 'WARNING'
"""

DATASET_CFG = """
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='RemapAnomalyLabels'),
    dict(type='PackSegInputs'),
]
test_dataloader = dict(batch_size=2, num_workers=0, sampler=dict(type='DefaultSampler',
                       shuffle=False),
                       dataset=dict(type='{type}', data_root='{root}', pipeline=test_pipeline))
test_evaluator = dict(type='AnomalyMetric', score_names=['msp'], track='obstacle')
dataset_split = 'validation'
{extra}
"""


def _folder(root, anomaly_value, n=3):
    rng = np.random.default_rng(anomaly_value)
    (root / 'images').mkdir(parents=True)
    (root / 'labels_masks').mkdir()
    for i in range(n):
        cv2.imwrite(str(root / 'images' / f'f{i}.png'),
                    rng.integers(0, 255, (32, 40, 3), dtype=np.uint8))
        label = np.zeros((32, 40), np.uint8)
        label[8:16, 8 + i:20 + i] = anomaly_value
        label[-4:] = 255
        cv2.imwrite(str(root / 'labels_masks' / f'f{i}.png'), label)


def _tiny_checkpoint(tmp_path):
    """The tiny EoMT config and a checkpoint of it."""
    init_default_scope('mmseg')
    cfg_path = tmp_path / 'tiny_eomt.py'
    cfg_path.write_text(MODEL_CFG)
    ns = {}
    exec(MODEL_CFG, ns)
    model = MODELS.build(ns['model'])
    ckpt = tmp_path / 'tiny.pth'
    torch.save({'state_dict': model.state_dict(), 'meta': {}}, ckpt)
    return cfg_path, ckpt


def _load_tool():
    spec = importlib.util.spec_from_file_location('eval_anomaly',
                                                  osp.join(ROOT, 'tools', 'eval_anomaly.py'))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


@pytest.mark.slow
def test_eval_tool_prints_one_table(tmp_path, capsys):
    cfg_path, ckpt = _tiny_checkpoint(tmp_path)
    specs = []
    for name, dtype, value in (('ra21', 'RoadAnomaly21Dataset', 1),
                               ('ra', 'RoadAnomalyDataset', 2)):
        root = tmp_path / name
        _folder(root, value)
        ds_cfg = tmp_path / f'anomaly_{name}.py'
        extra = "smiyc_submission_name = 'AnomalyTrack-all'" if name == 'ra21' else ''
        ds_cfg.write_text(DATASET_CFG.format(type=dtype, root=root, extra=extra))
        specs.append(f'{name}={ds_cfg}')

    tool = _load_tool()
    out_dir = tmp_path / 'out'
    submission = tmp_path / 'smiyc'
    (submission / 'old').mkdir(parents=True)
    base_args = [str(cfg_path), str(ckpt), '--datasets', *specs, '--scores', 'msp', 'rba',
                 '--out-dir', str(out_dir), '--component-metrics', '--protocol', 'exact',
                 'smiyc']
    if HAS_H5PY:  # the submission writer's optional dependency (extra 'smiyc')
        base_args += ['--smiyc-submission', str(submission), '--smiyc-score', 'rba']
        # A submission folder that is not empty is refused before anything is inferred.
        with pytest.raises(FileExistsError, match='not empty'):
            tool.main(base_args)
        assert not out_dir.exists()
        (submission / 'old').rmdir()
    results = tool.main(base_args + ['--show-dir', str(tmp_path / 'vis'), '--show-score', 'rba',
                                     '--max-show', '2'])
    assert set(results) == {'ra21', 'ra'}
    for metrics in results.values():
        for score in ('msp', 'rba'):
            for key in (f'{score}/AuPRC', f'{score}/AUROC', f'smiyc/{score}/AuPRC'):
                assert 0 <= metrics[key] <= 100
            assert f'{score}/mean_F1' in metrics and f'smiyc/{score}/mean_F1' in metrics
    printed = capsys.readouterr().out
    assert 'dataset' in printed and 'ra21' in printed and 'AuPRC' in printed
    if HAS_H5PY:
        assert 'AnomalyTrack-all: 3 frames' in printed and 'Upload' in printed
        assert 'ra is not a SegmentMeIfYouCan dataset' in printed
    with open(out_dir / 'anomaly.csv') as f:
        rows = list(csv.reader(f))
    assert rows[0] == ['protocol', 'dataset', 'split', 'score', 'frames', 'labelled_pixels',
                       'AuPRC', 'FPR95', 'AUROC', 'sIoU', 'PPV', 'mean_F1']
    # One inference per dataset, one row per protocol x score; frames and labelled pixels.
    assert [r[:4] for r in rows[1:]] == [
        [p, d, 'validation', s] for d in ('ra21', 'ra') for p in ('exact', 'smiyc')
        for s in ('msp', 'rba')]
    assert all(r[4] == '3' and r[5] == str(3 * 28 * 40) for r in rows[1:])
    table = json.loads((out_dir / 'anomaly.json').read_text())
    assert table[0]['AuPRC'] == pytest.approx(results['ra21']['msp/AuPRC'])
    assert table[2]['AuPRC'] == pytest.approx(results['ra21']['smiyc/msp/AuPRC'])
    if HAS_H5PY:
        from eomt_mm.anomaly.smiyc.submission import read_submission_frame
        folder = submission / 'anomaly_p' / 'tiny_eomt' / 'AnomalyTrack-all'
        assert sorted(p.name for p in folder.iterdir()) == ['f0.hdf5', 'f1.hdf5', 'f2.hdf5']
        stored = read_submission_frame(str(folder / 'f0.hdf5'))
        assert stored.dtype == np.float16 and stored.shape == (32, 40)
    pictures = sorted(p.name for p in (tmp_path / 'vis' / 'ra').iterdir())
    assert pictures == ['f0_rba.png', 'f1_rba.png']
    picture = cv2.imread(str(tmp_path / 'vis' / 'ra' / 'f0_rba.png'))
    assert picture.shape == (32, 3 * 40, 3)  # image | heat map | ground truth
    gt_panel = picture[:, 80:]
    assert (gt_panel[8:16, 8:20] == 255).all() and (gt_panel[-4:] == 128).all()
    with pytest.raises(FileNotFoundError, match='known names'):
        tool.main([str(cfg_path), str(ckpt), '--datasets', 'nonexistent'])
    for bad in (['--protocol', 'leaderboard'], ['--track', 'lane']):
        with pytest.raises(SystemExit):
            tool.main([str(cfg_path), str(ckpt), '--datasets', *specs] + bad)
    assert 'invalid choice' in capsys.readouterr().err


# The SegmentMeIfYouCan test frames (labels hidden), as configs/_base_/datasets/
# anomaly_smiyc_anomaly_track_test.py reads them: images only, a pipeline without annotations;
# one frame per batch, as the frames differ in size.
TEST_SPLIT_CFG = """
test_dataloader = dict(batch_size=1, num_workers=0, sampler=dict(type='DefaultSampler',
                       shuffle=False),
                       dataset=dict(type='SMIYCDataset', data_root='{root}', split='test',
                                    pipeline=[dict(type='LoadImageFromFile'),
                                              dict(type='PackSegInputs')]))
test_evaluator = dict(type='AnomalyMetric', score_names=['msp'])
dataset_split = 'test'
smiyc_submission_name = 'AnomalyTrack-all'
"""
TEST_FRAMES = {'airplane0000': (32, 40), 'animals0001': (24, 48), 'zebra0002': (40, 32)}


def _smiyc_anomaly_track(root):
    """A dataset_AnomalyTrack folder: 2 labelled validation frames, 3 test frames (images only,
    of different sizes) whose labels are hidden."""
    rng = np.random.default_rng(3)
    (root / 'images').mkdir(parents=True)
    (root / 'labels_masks').mkdir()
    for i in range(2):
        cv2.imwrite(str(root / 'images' / f'validation000{i}.jpg'),
                    rng.integers(0, 255, (32, 40, 3), dtype=np.uint8))
        label = np.zeros((32, 40), np.uint8)
        label[4:12, 6 + i:18 + i] = 1
        cv2.imwrite(str(root / 'labels_masks' / f'validation000{i}_labels_semantic.png'), label)
    for name, shape in TEST_FRAMES.items():
        cv2.imwrite(str(root / 'images' / f'{name}.jpg'),
                    rng.integers(0, 255, (*shape, 3), dtype=np.uint8))


@pytest.mark.slow
@pytest.mark.skipif(not HAS_H5PY, reason='the submission writer needs the smiyc extra (h5py)')
def test_eval_tool_writes_the_test_split_without_metrics(tmp_path, capsys):
    from eomt_mm.anomaly.smiyc.submission import read_submission_frame
    cfg_path, ckpt = _tiny_checkpoint(tmp_path)
    track = tmp_path / 'dataset_AnomalyTrack'
    _smiyc_anomaly_track(track)
    validation_cfg = tmp_path / 'validation.py'
    validation_cfg.write_text(DATASET_CFG.format(
        type='SMIYCDataset', root=track, extra="smiyc_submission_name = 'AnomalyTrack-all'"))
    test_cfg = tmp_path / 'test.py'
    test_cfg.write_text(TEST_SPLIT_CFG.format(root=track))
    tool = _load_tool()
    out_dir, submission = tmp_path / 'out', tmp_path / 'smiyc'
    base = [str(cfg_path), str(ckpt), '--scores', 'msp', 'rba', '--protocol', 'exact', 'smiyc',
            '--out-dir', str(out_dir)]

    # Before anything is inferred: an images-only split needs a submission folder, and a frame
    # may be written once only.
    with pytest.raises(ValueError, match=r'smiyc_test \(test\) is an images-only split .*'
                                         r'--smiyc-submission'):
        tool.main(base + ['--datasets', f'smiyc_test={test_cfg}'])
    with pytest.raises(ValueError, match="frame 'airplane0000' of AnomalyTrack-all is in both "
                                         'first and second'):
        tool.main(base + ['--datasets', f'first={test_cfg}', f'second={test_cfg}',
                          '--smiyc-submission', str(submission)])
    assert not out_dir.exists() and not any(submission.iterdir())
    capsys.readouterr()

    # Only the test split: its files, no metric table.
    results = tool.main(base + ['--datasets', f'smiyc_test={test_cfg}',
                                '--smiyc-submission', str(submission), '--smiyc-score', 'rba'])
    assert results == {'smiyc_test': {}}
    printed = capsys.readouterr().out
    assert 'smiyc_test (test): 3 frames written to AnomalyTrack-all, no labels: no metrics' \
        in printed
    assert 'no labelled dataset in this run: no metric table' in printed and 'AuPRC' not in printed
    assert "the benchmark's AnomalyTrack-all has 110 frames" in printed  # incomplete, said so
    folder = submission / 'anomaly_p' / 'tiny_eomt' / 'AnomalyTrack-all'
    assert sorted(p.name for p in folder.iterdir()) == [f'{n}.hdf5' for n in sorted(TEST_FRAMES)]
    for name, shape in TEST_FRAMES.items():  # full image resolution, as the server reads it
        stored = read_submission_frame(str(folder / f'{name}.hdf5'))
        assert stored.dtype == np.float16 and stored.shape == shape
        assert np.isfinite(stored).all() and stored.std() > 0

    # Validation (labelled) and test (images only) in one run: one table for the validation,
    # the files of all five frames in the benchmark's folder.
    submission2 = tmp_path / 'smiyc2'
    results = tool.main(base + ['--datasets', f'smiyc_val={validation_cfg}',
                                f'smiyc_test={test_cfg}', '--smiyc-submission', str(submission2),
                                '--show-dir', str(tmp_path / 'vis')])
    assert results['smiyc_test'] == {}
    assert 0 <= results['smiyc_val']['msp/AuPRC'] <= 100
    assert 0 <= results['smiyc_val']['smiyc/rba/AuPRC'] <= 100
    printed = capsys.readouterr().out
    assert 'smiyc_test (test): 3 frames written to AnomalyTrack-all, no labels: no metrics' \
        in printed and 'AnomalyTrack-all: 5 frames' in printed
    with open(out_dir / 'anomaly.csv') as f:
        rows = list(csv.reader(f))
    assert [r[:5] for r in rows[1:]] == [[p, 'smiyc_val', 'validation', s, '2']
                                         for p in ('exact', 'smiyc') for s in ('msp', 'rba')]
    folder = submission2 / 'anomaly_p' / 'tiny_eomt' / 'AnomalyTrack-all'
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [f'{n}.hdf5' for n in TEST_FRAMES] + ['validation0000.hdf5', 'validation0001.hdf5'])
    assert read_submission_frame(str(folder / 'validation0001.hdf5')).shape == (32, 40)
    # Heat maps of the images-only frames have no ground-truth panel to fill, but are drawn.
    assert sorted(p.name for p in (tmp_path / 'vis' / 'smiyc_test').iterdir()) == [
        f'{n}_msp.png' for n in sorted(TEST_FRAMES)]
