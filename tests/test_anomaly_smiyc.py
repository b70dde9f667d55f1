"""The SMIYC protocol (eomt_mm.anomaly.smiyc) against the benchmark's own evaluator.

``tests/fixtures/smiyc_reference.{json,npz}`` hold generated frames and what
SegmentMeIfYouCan/road-anomaly-benchmark computed on them (its header says which commit and the
command; ``tests/fixtures/make_smiyc_fixture.py`` produced it).
"""
import json
import os.path as osp

import numpy as np
import pytest

from eomt_mm.anomaly.smiyc import (FramePixelBins, frame_components, frame_pixel_bins,
                                   lostandfound_anomaly_label, lostandfound_obstacle_label,
                                   merge_components, merge_pixel_bins, track_sizes)

FIXTURE = osp.join(osp.dirname(__file__), 'fixtures', 'smiyc_reference')
TOL = 1e-9


@pytest.fixture(scope='module')
def reference():
    with open(FIXTURE + '.json') as f:
        header = json.load(f)
    with np.load(FIXTURE + '.npz') as z:
        arrays = {k: z[k] for k in z.files}
    return header, arrays


def _frame(arrays, name, dtype='float32'):
    return arrays[f'frames/{name}/score'].astype(dtype), arrays[f'frames/{name}/label']


def _dataset_frames(header, arrays, dataset):
    spec = header['datasets'][dataset]
    return [(name, *_frame(arrays, name, spec['score_dtype'])) for name in spec['frames']]


def _pixel(header, arrays, dataset, reverse=False):
    frames = _dataset_frames(header, arrays, dataset)
    bins = [frame_pixel_bins(score, label) for _, score, label in frames]
    return merge_pixel_bins(bins[::-1] if reverse else bins)


def test_fixture_header_says_how_it_was_made(reference):
    header, _ = reference
    assert header['benchmark'].endswith('SegmentMeIfYouCan/road-anomaly-benchmark')
    assert len(header['benchmark_commit']) == 40
    assert 'make_smiyc_fixture.py' in header['command']
    assert header['benchmark_commit'] in header['command']


@pytest.mark.parametrize('dataset', ['mixed_float32', 'mixed_float16', 'tied_maxima'])
def test_frame_bins_equal_the_benchmarks(reference, dataset):
    header, arrays = reference
    for name, score, label in _dataset_frames(header, arrays, dataset):
        bins = frame_pixel_bins(score, label)
        thresholds, positives, negatives = arrays[f'bins/{dataset}/{name}']
        assert bins.thresholds.shape == thresholds.shape, name
        np.testing.assert_array_equal(bins.thresholds, thresholds, err_msg=name)
        np.testing.assert_array_equal(bins.positives, positives, err_msg=name)
        np.testing.assert_array_equal(bins.negatives, negatives, err_msg=name)
        assert bins.thresholds.size <= 769


@pytest.mark.parametrize('dataset', ['mixed_float32', 'mixed_float16', 'tied_maxima'])
def test_pixel_metrics_equal_the_benchmarks(reference, dataset):
    header, arrays = reference
    expected = header['results'][dataset]['pixel']
    result = _pixel(header, arrays, dataset)
    assert result.average_precision == pytest.approx(expected['area_PRC'], abs=TOL)
    assert result.fpr_at_95_tpr == pytest.approx(expected['tpr95_fpr'], abs=TOL)
    assert result.tpr95_threshold == pytest.approx(expected['tpr95_threshold'], abs=TOL)
    assert result.auroc == pytest.approx(expected['area_ROC'], abs=TOL)
    assert result.best_f1 == pytest.approx(expected['best_f1'], abs=TOL)
    assert result.best_f1_threshold == pytest.approx(expected['best_f1_threshold'], abs=TOL)
    assert result.num_positives == expected['num_positives']
    assert result.num_negatives == expected['num_negatives']


@pytest.mark.parametrize('dataset', ['mixed_float32', 'mixed_float16', 'tied_maxima'])
@pytest.mark.parametrize('track', ['anomaly', 'obstacle'])
def test_component_metrics_equal_the_benchmarks(reference, dataset, track):
    header, arrays = reference
    expected = header['results'][dataset][track]
    # The benchmark's threshold is the pixel best-F1 threshold it saved; ours must be the same.
    threshold = _pixel(header, arrays, dataset).best_f1_threshold
    assert threshold == pytest.approx(expected['threshold'], abs=TOL)
    per_frame = []
    for name, score, label in _dataset_frames(header, arrays, dataset):
        stats = frame_components(score, label, threshold, track)
        prefix = f'components/{dataset}/{track}/{name}'
        for ours, theirs in ((stats.siou_gt, 'sIoU_gt'), (stats.siou_pred, 'sIoU_pred'),
                             (stats.ppv_pred, 'prec_pred')):
            np.testing.assert_allclose(ours, arrays[f'{prefix}/{theirs}'], rtol=0, atol=TOL,
                                       err_msg=f'{name} {theirs}')
        per_frame.append(stats)
    result = merge_components(per_frame, threshold)
    assert result.siou_gt == pytest.approx(expected['sIoU_gt'], abs=TOL)
    assert result.siou_pred == pytest.approx(expected['sIoU_pred'], abs=TOL)
    assert result.ppv == pytest.approx(expected['prec_pred'], abs=TOL)
    assert result.f1_mean == pytest.approx(expected['f1_mean'], abs=TOL)
    for key in ('25', '50', '75'):
        assert result.f1[key] == pytest.approx(expected[f'f1_{key}'], abs=TOL)
        assert result.tp[key] == expected[f'tp_{key}']
        assert result.fn[key] == expected[f'fn_{key}']
        assert result.fp[key] == expected[f'fp_{key}']
    assert result.num_gt > 0 and result.num_pred > 0


def test_all_void_frame_adds_nothing(reference):
    header, arrays = reference
    # The benchmark cannot bin a frame without a labelled pixel; here it contributes nothing.
    assert 'zero-size array' in header['results']['all_void_pixel_error']
    score, label = _frame(arrays, 'all_void')
    bins = frame_pixel_bins(score, label)
    assert bins.thresholds.size == 0 and bins.num_positives == 0 and bins.num_negatives == 0
    frames = _dataset_frames(header, arrays, 'mixed_float32')
    all_bins = [frame_pixel_bins(s, lab) for _, s, lab in frames]
    with_void = merge_pixel_bins(all_bins[:2] + [bins] + all_bins[2:])
    without = merge_pixel_bins(all_bins)
    assert with_void.average_precision == without.average_precision
    assert with_void.best_f1_threshold == without.best_f1_threshold
    assert with_void.num_frames == without.num_frames + 1
    for track in ('anomaly', 'obstacle'):
        stats = frame_components(score, label, 0.5, track)
        assert [stats.siou_gt.size, stats.ppv_pred.size] == \
            header['results'][f'all_void_{track}_components']


def test_merge_is_independent_of_frame_order_without_tied_maxima(reference):
    header, arrays = reference
    forward = _pixel(header, arrays, 'mixed_float32')
    backward = _pixel(header, arrays, 'mixed_float32', reverse=True)
    assert forward == backward
    # Where frames share the highest score, the curve's first point follows the frame order
    # (as in the benchmark): reordering changes AP.
    tied = _pixel(header, arrays, 'tied_maxima')
    tied_reversed = _pixel(header, arrays, 'tied_maxima', reverse=True)
    assert tied.average_precision != tied_reversed.average_precision


def test_packed_bins_round_trip_and_stay_small(reference):
    header, arrays = reference
    frames = _dataset_frames(header, arrays, 'mixed_float16')
    bins = [frame_pixel_bins(score, label) for _, score, label in frames]
    unpacked = [FramePixelBins.unpack(b.pack()) for b in bins]
    assert merge_pixel_bins(unpacked) == merge_pixel_bins(bins)
    rng = np.random.default_rng(0)
    label = (rng.uniform(size=(300, 400)) < 0.1).astype(np.uint8)
    big = frame_pixel_bins(rng.normal(size=(300, 400)).astype(np.float32), label)
    assert big.pack().shape[0] == 3 and big.pack().shape[1] <= 769
    assert big.num_positives + big.num_negatives == label.size
    with pytest.raises(ValueError, match=r'\[3, B\]'):
        FramePixelBins.unpack(np.zeros((2, 5)))


def test_lostandfound_labels_equal_the_benchmarks(reference):
    _, arrays = reference
    label_ids = arrays['laf/label_ids']
    np.testing.assert_array_equal(lostandfound_obstacle_label(label_ids),
                                  arrays['laf/obstacle_label'])
    np.testing.assert_array_equal(lostandfound_anomaly_label(label_ids, arrays['laf/roi_mask']),
                                  arrays['laf/anomaly_label'])
    with pytest.raises(ValueError, match='differ in shape'):
        lostandfound_anomaly_label(label_ids, arrays['laf/roi_mask'][:, 1:])
    with pytest.raises(TypeError, match='boolean'):
        lostandfound_anomaly_label(label_ids, arrays['laf/roi_mask'].astype(np.uint8))


def test_bad_input_is_a_clear_error():
    score = np.zeros((4, 5), np.float32)
    label = np.zeros((4, 5), np.uint8)
    label[1, 1] = 1
    with pytest.raises(ValueError, match="unknown SMIYC track 'road'"):
        frame_components(score, label, 0.5, 'road')
    with pytest.raises(ValueError, match="unknown SMIYC track"):
        track_sizes('Anomaly')
    bad = label.copy()
    bad[0, 0] = 2
    with pytest.raises(ValueError, match=r'0 \(inlier\), 1 \(anomaly\) or 255.*\[2\]'):
        frame_pixel_bins(score, bad)
    with pytest.raises(ValueError, match='from -1 to 1'):
        frame_components(score, label.astype(np.int16) - (label == 0), 0.5, 'anomaly')
    with pytest.raises(ValueError, match='differ in shape'):
        frame_pixel_bins(score[:, :4], label)
    with pytest.raises(TypeError, match='floating point'):
        frame_pixel_bins(score.astype(np.int32), label)
    with pytest.raises(TypeError, match='integer array'):
        frame_pixel_bins(score, label.astype(np.float32))
    nan_score = score.copy()
    nan_score[2, 2] = np.nan
    with pytest.raises(ValueError, match='must be finite'):
        frame_pixel_bins(nan_score, label)
    nan_label = label.copy()
    nan_label[2, 2] = 255
    frame_pixel_bins(nan_score, nan_label)  # void pixels may hold anything
    with pytest.raises(ValueError, match='need anomaly and inlier pixels'):
        merge_pixel_bins([frame_pixel_bins(score, np.zeros_like(label))])
    with pytest.raises(ValueError, match='empty list'):
        merge_pixel_bins([])
    with pytest.raises(TypeError, match='expected FramePixelBins'):
        merge_pixel_bins([np.zeros((3, 2))])
    with pytest.raises(ValueError, match='threshold must be finite'):
        frame_components(score, label, float('inf'), 'obstacle')
