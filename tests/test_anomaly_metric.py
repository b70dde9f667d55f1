"""Pooled anomaly metrics against scikit-learn, AnomalyMetric end to end, component metrics."""
import random

import numpy as np
import pytest
import torch
from mmengine.structures import PixelData
from mmseg.registry import METRICS
from mmseg.structures import SegDataSample
from sklearn.metrics import (average_precision_score, precision_recall_curve, roc_auc_score,
                             roc_curve)

from eomt_mm.anomaly.component_metrics import (F1_TAUS, aggregate_component_stats,
                                               frame_component_stats)
from eomt_mm.anomaly.pixel_metrics import (pixel_metrics_from_arrays, pooled_pixel_metrics,
                                           split_by_label)

TOL = 1e-9


def _sklearn_reference(scores, labels):
    """The protocol written with scikit-learn (float64 pooled arrays)."""
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    prec, rec, thr = precision_recall_curve(labels, scores)
    with np.errstate(invalid='ignore', divide='ignore'):
        f1 = 2 * prec * rec / (prec + rec)
    best = int(np.nanargmax(f1))
    return dict(auprc=average_precision_score(labels, scores),
                fpr=fpr[np.argmax(tpr >= 0.95)],
                auroc=roc_auc_score(labels, scores),
                best_f1=f1[best], best_thr=thr[best])


def _assert_matches(ours, ref):
    assert ours.auprc == pytest.approx(ref['auprc'], abs=TOL)
    assert ours.fpr_at_tpr == pytest.approx(ref['fpr'], abs=TOL)
    assert ours.auroc == pytest.approx(ref['auroc'], abs=TOL)
    assert ours.best_f1 == pytest.approx(ref['best_f1'], abs=TOL)
    assert ours.best_f1_threshold == ref['best_thr']


@pytest.mark.parametrize('levels', [None, 3, 20, 300])
@pytest.mark.parametrize('pos_rate', [0.02, 0.3])
def test_pixel_metrics_match_sklearn(levels, pos_rate):
    rng = np.random.default_rng(levels or 0)
    n = 30000
    labels = rng.random(n) < pos_rate
    scores = (rng.normal(size=n) + 1.3 * labels).astype(np.float32)
    if levels:  # heavy ties: few distinct values, ties across both classes
        scores = np.round(scores * levels / 4).astype(np.float32)
    ours = pixel_metrics_from_arrays(scores, labels)
    _assert_matches(ours, _sklearn_reference(scores, labels))
    assert ours.num_pos == labels.sum() and ours.num_neg == (~labels).sum()


def test_fpr95_definition_on_a_hand_made_curve():
    # Descending thresholds 0.9, 0.8, 0.7, 0.6 with (pos, neg) counts (10,0) (9,1) (1,5) (0,4):
    # TPR 0.5, 0.95, 1.0 -> first TPR >= 0.95 at 0.8 with FP = 1 of 10 negatives.
    pos = np.array([0.9] * 10 + [0.8] * 9 + [0.7], dtype=np.float32)
    neg = np.array([0.8] + [0.7] * 5 + [0.6] * 4, dtype=np.float32)
    out = pooled_pixel_metrics(pos, neg)
    assert out.fpr_at_tpr == pytest.approx(0.1)
    # AP = 10/20 * 1 + 9/20 * 19/20 + 1/20 * 20/26
    assert out.auprc == pytest.approx(0.5 + 9 / 20 * 19 / 20 + 1 / 20 * 20 / 26)
    # AUROC: each positive beats the negatives below it, ties count one half.
    wins = 10 * 10 + 9 * (9 + 0.5) + 1 * (4 + 2.5)
    assert out.auroc == pytest.approx(wins / 200)


def test_pixel_metrics_edge_cases():
    nan_out = pooled_pixel_metrics(np.zeros(0, np.float32), np.ones(5, np.float32))
    assert np.isnan(nan_out.auprc) and np.isnan(nan_out.auroc) and nan_out.num_neg == 5
    only_pos = pooled_pixel_metrics(np.ones(3, np.float32), np.zeros(0, np.float32))
    assert only_pos.auprc == 1.0 and np.isnan(only_pos.auroc) and np.isnan(only_pos.fpr_at_tpr)
    with pytest.raises(TypeError, match='float32'):
        pooled_pixel_metrics(np.ones(3), np.ones(3, np.float32))
    with pytest.raises(ValueError, match='NaN'):
        pooled_pixel_metrics(np.array([np.nan], np.float32), np.ones(3, np.float32))
    with pytest.raises(ValueError, match='tpr_level'):
        pooled_pixel_metrics(np.ones(3, np.float32), np.ones(3, np.float32), tpr_level=0)
    with pytest.raises(ValueError, match=r'found \[7\]'):
        split_by_label(np.ones(3, np.float32), np.array([0, 7, 255]))
    # -0.0 and 0.0 are one threshold, as in scikit-learn.
    scores = np.array([0.0, -0.0, 0.0, 1.0], np.float32)
    labels = np.array([True, False, False, True])
    _assert_matches(pixel_metrics_from_arrays(scores, labels), _sklearn_reference(scores, labels))


def test_in_place_and_sorted_inputs_agree():
    rng = np.random.default_rng(3)
    pos = rng.normal(1, size=500).astype(np.float32)
    neg = rng.normal(size=4000).astype(np.float32)
    ref = pooled_pixel_metrics(pos, neg)
    assert not np.all(np.diff(pos) >= 0)  # the default leaves the inputs untouched
    pos.sort()
    neg.sort()
    assert pooled_pixel_metrics(pos, neg, sorted_inputs=True) == ref


# ---------------------------------------------------------------- AnomalyMetric


def _make_samples(seed, n_images=9, shape=(12, 16), names=('msp', 'rba')):
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n_images):
        label = np.where(rng.random(shape) < 0.1, 255, (rng.random(shape) < 0.2).astype(np.uint8))
        label = label.astype(np.uint8)
        if i % 4 == 1:
            label[label == 1] = 0  # all-negative image
        if i % 4 == 2:
            label[:] = 255  # void-only image
        sample = SegDataSample()
        sample.set_metainfo(dict(img_path=f'img_{i}.png'))
        sample.gt_sem_seg = PixelData(data=torch.from_numpy(label)[None].long())
        fields = {}
        for k, name in enumerate(names):
            base = rng.normal(size=shape) + (label == 1) * (1.0 + k)
            if name == 'rba':  # quantised: ties across images and classes
                base = np.round(base * 2) / 2
            fields[name] = torch.from_numpy(base.astype(np.float32))[None]
        sample.anomaly_scores = PixelData(**fields)
        samples.append(sample)
    return samples


def _pooled(samples, name):
    scores = np.concatenate([s.anomaly_scores.get(name).numpy().ravel() for s in samples])
    labels = np.concatenate([s.gt_sem_seg.data.numpy().ravel() for s in samples])
    keep = labels != 255
    return scores[keep], labels[keep] == 1


def test_registered_metric_matches_sklearn():
    samples = _make_samples(0)
    metric = METRICS.build(dict(type='AnomalyMetric', score_names=['msp', 'rba']))
    # mmengine's Evaluator hands the metric dicts; a SegDataSample works as well.
    metric.process({}, [s.to_dict() for s in samples[:5]])
    metric.process({}, samples[5:])
    out = metric.evaluate(len(samples))
    assert set(out) == {f'{n}/{k}' for n in ('msp', 'rba') for k in ('AuPRC', 'FPR95', 'AUROC')}
    for name in ('msp', 'rba'):
        ref = _sklearn_reference(*_pooled(samples, name))
        assert out[f'{name}/AuPRC'] == pytest.approx(100 * ref['auprc'], abs=100 * TOL)
        assert out[f'{name}/FPR95'] == pytest.approx(100 * ref['fpr'], abs=100 * TOL)
        assert out[f'{name}/AUROC'] == pytest.approx(100 * ref['auroc'], abs=100 * TOL)


def test_metric_default_names_and_errors():
    samples = _make_samples(1, n_images=3, names=('energy',))
    metric = METRICS.build(dict(type='AnomalyMetric'))
    metric.process({}, [s.to_dict() for s in samples])
    assert set(metric.evaluate(3)) == {'energy/AuPRC', 'energy/FPR95', 'energy/AUROC'}

    bad = _make_samples(2, n_images=1)[0]
    bad.gt_sem_seg.data[0, 0, 0] = 2
    with pytest.raises(ValueError, match=r'img_0\.png.*\[2\]'):
        METRICS.build(dict(type='AnomalyMetric')).process({}, [bad.to_dict()])
    missing = _make_samples(2, n_images=1, names=('msp',))[0]
    with pytest.raises(KeyError, match="'rba' missing"):
        METRICS.build(dict(type='AnomalyMetric', score_names=['rba'])).process({}, [missing])
    with pytest.raises(ValueError, match='valid names'):
        METRICS.build(dict(type='AnomalyMetric', score_names=['softmax']))
    small = _make_samples(2, n_images=1, names=('msp',))[0]
    small.anomaly_scores = PixelData(msp=torch.zeros(1, 6, 8))
    with pytest.raises(ValueError, match='label resolution'):
        METRICS.build(dict(type='AnomalyMetric')).process({}, [small])


def test_distributed_collection_is_identical():
    """Any split over ranks and any gathering order gives bit-identical numbers."""
    samples = _make_samples(4, n_images=13)
    single = METRICS.build(dict(type='AnomalyMetric', score_names=['msp', 'rba']))
    single.process({}, [s.to_dict() for s in samples])
    expected = single.compute_metrics(single.results)

    for world_size in (2, 3):
        ranks = [METRICS.build(dict(type='AnomalyMetric', score_names=['msp', 'rba']))
                 for _ in range(world_size)]
        for i, s in enumerate(samples):  # DistributedSampler: rank r gets items r, r+W, ...
            ranks[i % world_size].process({}, [s.to_dict()])
        # collect_results re-interleaves the parts; shuffling covers any order at all.
        gathered = [r for m in ranks for r in m.results]
        assert len(gathered) == len(samples)
        random.Random(world_size).shuffle(gathered)
        assert ranks[0].compute_metrics(gathered) == expected


# ---------------------------------------------------------------- component metrics


def _component_frame():
    """10x12 frame: GT A (3x3), GT B (2x2), one prediction covering both, one stray."""
    label = np.zeros((10, 12), np.uint8)
    label[1:4, 1:4] = 1  # A: 9 px
    label[1:3, 6:8] = 1  # B: 4 px
    label[7, 5:10] = 255  # void strip
    score = np.zeros((10, 12), np.float32)
    score[1:4, 1:8] = 1.0  # P: 21 px touching A and B
    score[5, 0:2] = 1.0  # Q: 2 px, no GT
    score[7, 5:10] = 1.0  # inside void: never a component
    score[9, 11] = 0.5  # exactly at the threshold: not predicted (score > threshold)
    return score, label


def test_component_stats_hand_computed():
    score, label = _component_frame()
    stats = frame_component_stats(score, label, 0.5, min_pred_size=1, min_gt_size=1)
    # sIoU(A) = 9 / (21 + 9 - 9 - 4): the 4 px of B inside P are not counted against A.
    np.testing.assert_allclose(sorted(stats.siou_gt), sorted([9 / 17, 4 / 12]))
    np.testing.assert_allclose(sorted(stats.ppv_pred), [0.0, 13 / 21])
    agg = aggregate_component_stats([stats])
    assert agg['sIoU'] == pytest.approx((9 / 17 + 4 / 12) / 2)
    assert agg['PPV'] == pytest.approx(13 / 42)
    # tau 0.25, 0.30: TP 2, FN 0, FP 1 -> 0.8 ; 0.35..0.50: TP 1, FN 1, FP 1 -> 0.5 ; rest 0.
    assert agg['mean_F1'] == pytest.approx((2 * 0.8 + 4 * 0.5) / 11)
    assert agg['F1@0.25'] == pytest.approx(0.8) and agg['F1@0.75'] == 0.0
    assert len(F1_TAUS) == 11

    # Size filters: Q (2 px) dropped; B (4 px) becomes void, so P shrinks to 17 px in the ROI.
    filt = frame_component_stats(score, label, 0.5, min_pred_size=3, min_gt_size=5)
    np.testing.assert_allclose(filt.siou_gt, [9 / 17])
    np.testing.assert_allclose(filt.ppv_pred, [9 / 17])
    # Two frames pool their components.
    agg2 = aggregate_component_stats([stats, filt])
    assert agg2['sIoU'] == pytest.approx((9 / 17 + 4 / 12 + 9 / 17) / 3)


def test_component_eight_connectivity_and_bad_track():
    label = np.zeros((5, 5), np.uint8)
    label[1, 1] = label[2, 2] = 1  # diagonal neighbours: one 8-connected component
    score = label.astype(np.float32)
    stats = frame_component_stats(score, label, 0.5, 1, 1)
    assert stats.siou_gt.tolist() == [1.0] and stats.ppv_pred.tolist() == [1.0]
    with pytest.raises(ValueError, match='track'):
        METRICS.build(dict(type='AnomalyMetric', component_metrics=True, track='lane'))


def test_metric_component_metrics_use_best_f1_threshold():
    rng = np.random.default_rng(5)
    samples = []
    for i in range(3):
        label = np.zeros((40, 40), np.uint8)
        label[5 + i:20 + i, 8:22] = 1
        label[30:, :] = 255
        score = rng.normal(size=label.shape).astype(np.float32) + 2.5 * (label == 1)
        s = SegDataSample()
        s.gt_sem_seg = PixelData(data=torch.from_numpy(label)[None])
        s.anomaly_scores = PixelData(msp=torch.from_numpy(score)[None])
        samples.append(s)
    metric = METRICS.build(dict(type='AnomalyMetric', component_metrics=True, track='obstacle'))
    metric.process({}, [s.to_dict() for s in samples])
    out = metric.evaluate(3)
    scores, labels = _pooled(samples, 'msp')
    thr = _sklearn_reference(scores, labels)['best_thr']
    frames = [frame_component_stats(s.anomaly_scores.msp[0].numpy(),
                                    s.gt_sem_seg.data[0].numpy(), thr, 50, 10) for s in samples]
    ref = aggregate_component_stats(frames)
    for key in ('sIoU', 'PPV', 'mean_F1'):
        assert out[f'msp/{key}'] == pytest.approx(100 * ref[key])
    assert out['msp/sIoU'] > 50  # well-separated blobs are found


def _plain_component_stats(score, label, thr, min_pred, min_gt):
    """SegmentMeIfYouCan's component-metric definitions with one boolean mask per component (slow, obvious)."""
    from scipy import ndimage
    eight = np.ones((3, 3))
    gt_cc, n_gt = ndimage.label(label == 1, eight)
    pred_cc, n_pred = ndimage.label((score > thr) & (label != 255), eight)
    for c in range(1, n_pred + 1):
        if (pred_cc == c).sum() < min_pred:
            pred_cc[pred_cc == c] = 0
    label = label.copy()
    for c in range(1, n_gt + 1):
        if (gt_cc == c).sum() < min_gt:
            label[gt_cc == c] = 255
    roi = label != 255
    g, p = gt_cc[roi], pred_cc[roi]
    siou = []
    for i in np.unique(g[g > 0]):
        k = g == i
        k_hat = np.isin(p, np.unique(p[k & (p > 0)])) & (p > 0)
        inter = (k & k_hat).sum()
        other = (k_hat & (g > 0) & ~k).sum()
        siou.append(inter / (k_hat.sum() + k.sum() - inter - other))
    ppv = [((p == j) & (g > 0)).sum() / (p == j).sum() for j in np.unique(p[p > 0])]
    return np.sort(siou), np.sort(ppv)


def test_component_stats_match_plain_definition_on_random_blobs():
    from scipy import ndimage
    rng = np.random.default_rng(0)
    for _ in range(10):
        label = (ndimage.gaussian_filter(rng.random((60, 80)), 3) > 0.52).astype(np.uint8)
        label[rng.random(label.shape) < 0.02] = 255
        label[:5] = 255
        score = (ndimage.gaussian_filter(rng.random((60, 80)), 2) + 0.05 * label).astype(np.float32)
        ours = frame_component_stats(score, label, 0.52, 5, 4)
        siou, ppv = _plain_component_stats(score, label, 0.52, 5, 4)
        assert len(siou) > 0 and len(ppv) > 0
        np.testing.assert_allclose(np.sort(ours.siou_gt), siou)
        np.testing.assert_allclose(np.sort(ours.ppv_pred), ppv)


# Both protocols and component metrics, small merge chunks: every exchange path runs.
DIST_METRIC = dict(type='AnomalyMetric', score_names=['msp', 'rba'], protocol=['exact', 'smiyc'],
                   component_metrics=True, track='obstacle', merge_chunk_entries=40)


def _dist_worker(rank, world_size, port, out_dir):
    import torch.distributed as torch_dist

    import eomt_mm  # noqa: F401  (registers AnomalyMetric in the spawned process)
    torch_dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank,
                                  world_size=world_size)
    try:
        samples = _make_samples(6, n_images=7)
        (out_dir / f'spill{rank}').mkdir()
        metric = METRICS.build(dict(DIST_METRIC, spill_dir=str(out_dir / f'spill{rank}')))
        # DefaultSampler order without shuffle: rank r takes r, r + W, ... (padded by repeats).
        indices = list(range(rank, len(samples), world_size))
        metric.process({}, [samples[i].to_dict() for i in indices])
        if len(indices) < -(-len(samples) // world_size):
            metric.process({}, [samples[indices[0]].to_dict()])
        result = metric.evaluate(len(samples))
        assert not list((out_dir / f'spill{rank}').iterdir())  # spilled frames removed
        (out_dir / f'rank{rank}.json').write_text(__import__('json').dumps(result))
    finally:
        torch_dist.destroy_process_group()


@pytest.mark.dist
def test_real_gloo_evaluation_equals_single_process(tmp_path):
    import json
    import socket

    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    # fork: the children inherit the imported stack (spawn would re-import it, ~10 s each).
    mp.start_processes(_dist_worker, args=(2, port, tmp_path), nprocs=2, join=True,
                       start_method='fork')
    samples = _make_samples(6, n_images=7)
    single = METRICS.build(DIST_METRIC)
    single.process({}, [s.to_dict() for s in samples])
    expected = single.evaluate(len(samples))
    assert {'msp/AuPRC', 'smiyc/rba/FPR95', 'rba/mean_F1', 'smiyc/msp/sIoU'} <= set(expected)
    for rank in range(2):
        got = json.loads((tmp_path / f'rank{rank}.json').read_text())
        # Bit-identical (NaN where a component mean has nothing to average).
        assert got.keys() == expected.keys()
        assert all(got[k] == v or (v != v and got[k] != got[k]) for k, v in expected.items())
