"""Bounded-memory exact metrics (spilled sorted runs, chunked merge); AnomalyMetric protocols."""
import os

import numpy as np
import pytest
import torch
from mmengine.structures import PixelData
from mmseg.registry import METRICS
from mmseg.structures import SegDataSample
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from eomt_mm.anomaly import exact_store, pixel_metrics
from eomt_mm.anomaly.component_metrics import aggregate_component_stats, frame_component_stats
from eomt_mm.anomaly.exact_store import (chunk_plan, exact_pixel_metrics, float_keys, key_floats,
                                         spill_sorted_runs)
from eomt_mm.anomaly.pixel_metrics import pooled_pixel_metrics
from eomt_mm.anomaly.smiyc.components import frame_components, merge_components
from eomt_mm.anomaly.smiyc.pixel import frame_pixel_bins, merge_pixel_bins
from eomt_mm.anomaly.spill import SpillFolder, read_segment


def _frames(seed, n_frames=9, levels=None):
    """Per-frame (positives, negatives): ties, empty frames, one class only, -0.0 and 0.0."""
    rng = np.random.default_rng(seed)
    frames = []
    for i in range(n_frames):
        n = int(rng.integers(0, 3000)) if i % 5 else 0
        labels = rng.random(n) < 0.25
        scores = (rng.normal(size=n) + 1.2 * labels).astype(np.float32)
        if levels:
            scores = (np.round(scores * levels) / levels).astype(np.float32)
        if i == 3:
            labels[:] = False  # inliers only
        if n > 4:
            scores[:2] = [np.float32(-0.0), np.float32(0.0)]
        frames.append((scores[labels], scores[~labels]))
    return frames


@pytest.mark.parametrize('levels', [None, 2, 40])
def test_spilled_runs_equal_the_in_memory_reference_bit_for_bit(levels, monkeypatch):
    frames = _frames(levels or 1, levels=levels)
    ref = pooled_pixel_metrics(np.concatenate([p for p, _ in frames]),
                               np.concatenate([n for _, n in frames]))
    folder = SpillFolder()
    pos = [spill_sorted_runs(folder, p, 'pos') for p, _ in frames]
    neg = [spill_sorted_runs(folder, n, 'neg') for _, n in frames]
    # Heavy ties are stored run-length encoded, continuous scores one key per pixel.
    assert any(r.counts is not None for r in pos) == (levels is not None)
    for budget in (1, 50, 1 << 22):  # every chunk a single bucket ... everything in one chunk
        assert exact_pixel_metrics(pos, neg, max_entries=budget) == ref
    # Blocks of distinct values cut across chunks: the same fixed blocks as the reference.
    monkeypatch.setattr(pixel_metrics, '_BLOCK', 7)
    ref_small_blocks = pooled_pixel_metrics(np.concatenate([p for p, _ in frames]),
                                            np.concatenate([n for _, n in frames]))
    assert exact_pixel_metrics(pos, neg, max_entries=30) == ref_small_blocks
    assert ref_small_blocks.auprc == pytest.approx(ref.auprc, abs=1e-12)
    folder.close()


def test_exact_store_matches_sklearn_and_one_bucket_larger_than_the_budget():
    rng = np.random.default_rng(0)
    labels = rng.random(40000) < 0.1
    # All scores inside one bucket (one power of two, 1/8 of its mantissa range): the merge
    # streams frame groups into the running set.
    scores = (1.0 + 0.1 * rng.random(40000) + 0.02 * labels).astype(np.float32)
    folder = SpillFolder()
    parts = np.array_split(np.arange(scores.size), 8)
    pos = [spill_sorted_runs(folder, scores[i][labels[i]], 'p') for i in parts]
    neg = [spill_sorted_runs(folder, scores[i][~labels[i]], 'n') for i in parts]
    entries = np.zeros(exact_store.NUM_BUCKETS, np.int64)
    for run in pos + neg:
        entries[run.bucket_ids] += np.diff(run.bucket_ends, prepend=0)
    assert np.count_nonzero(entries) == 1 and len(chunk_plan(entries, 1000)) == 1
    out = exact_pixel_metrics(pos, neg, max_entries=1000)
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    assert out.auprc == pytest.approx(average_precision_score(labels, scores), abs=1e-9)
    assert out.auroc == pytest.approx(roc_auc_score(labels, scores), abs=1e-9)
    assert out.fpr_at_tpr == pytest.approx(fpr[np.argmax(tpr >= 0.95)], abs=1e-9)
    folder.close()


def test_float_keys_sort_like_floats_and_round_trip():
    rng = np.random.default_rng(1)
    tiny = np.finfo(np.float32).tiny
    values = np.concatenate([rng.normal(scale=10, size=500).astype(np.float32),
                             np.array([0.0, -0.0, tiny, -tiny, tiny / 4, -tiny / 4,
                                       np.finfo(np.float32).max, np.finfo(np.float32).min],
                                      np.float32)])
    keys = float_keys(values)
    assert keys.dtype == np.uint32
    np.testing.assert_array_equal(np.sort(values), key_floats(np.sort(keys)))
    assert float_keys(np.float32([-0.0]))[0] == float_keys(np.float32([0.0]))[0]
    assert chunk_plan(np.array([0, 5, 0, 5, 20, 1]), 10) == [(1, 4), (4, 5), (5, 6)]


def test_spill_folder_segments_and_cleanup(tmp_path):
    folder = SpillFolder(str(tmp_path))
    a = folder.append('x', np.arange(10, dtype=np.uint32))
    b = folder.append('x', np.arange(5, dtype=np.uint32) + 100)
    np.testing.assert_array_equal(read_segment(b, 1, 3), [101, 102])
    np.testing.assert_array_equal(read_segment(a), np.arange(10))
    assert folder.nbytes == 60 and os.listdir(tmp_path)
    folder.close()
    assert not os.listdir(tmp_path)
    with pytest.raises(FileNotFoundError, match='is gone'):
        read_segment(a)
    with pytest.raises(FileNotFoundError, match='spill folder parent'):
        SpillFolder(str(tmp_path / 'missing'))


# ---------------------------------------------------------------- AnomalyMetric protocols


def _samples(seed, n=6, shape=(40, 48)):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        label = np.zeros(shape, np.uint8)
        label[5 + i:20 + i, 6:25] = 1
        label[-6:] = 255
        if i == 2:
            label[label == 1] = 0  # no anomaly in this frame
        if i == 4:
            label[:] = 255  # all void
        score = (rng.normal(size=shape) + 2.0 * (label == 1)).astype(np.float32)
        score[:8, :8] = 3.0  # saturated patch: ties across frames and classes
        s = SegDataSample()
        s.set_metainfo(dict(img_path=f'frame_{i}.png'))
        s.gt_sem_seg = PixelData(data=torch.from_numpy(label)[None].long())
        s.anomaly_scores = PixelData(msp=torch.from_numpy(score)[None],
                                     rba=torch.from_numpy(np.round(score * 2) / 2)[None])
        out.append(s)
    return out


def _arrays(sample, name):
    return sample.anomaly_scores.get(name)[0].numpy(), sample.gt_sem_seg.data[0].numpy()


def test_both_protocols_in_one_pass_equal_each_protocol_alone(tmp_path):
    samples = _samples(0)
    common = dict(type='AnomalyMetric', component_metrics=True, track='obstacle',
                  spill_dir=str(tmp_path))
    both = METRICS.build(dict(common, protocol=('exact', 'smiyc'), merge_chunk_entries=64))
    exact = METRICS.build(dict(common, protocol='exact'))
    for metric in (both, exact):
        metric.process({}, [s.to_dict() for s in samples])
    assert os.listdir(tmp_path)  # frames are spilled ...
    out_both, out_exact = both.evaluate(len(samples)), exact.evaluate(len(samples))
    assert not os.listdir(tmp_path)  # ... and removed when the evaluation ends
    assert {k: v for k, v in out_both.items() if not k.startswith('smiyc/')} == out_exact

    for name in ('msp', 'rba'):
        arrays = [_arrays(s, name) for s in samples]
        pos = np.concatenate([sc[lb == 1] for sc, lb in arrays])
        neg = np.concatenate([sc[lb == 0] for sc, lb in arrays])
        ref = pooled_pixel_metrics(pos, neg)
        assert out_exact[f'{name}/AuPRC'] == ref.auprc * 100
        comp = aggregate_component_stats(frame_component_stats(sc, lb, ref.best_f1_threshold,
                                                               50, 10) for sc, lb in arrays)
        assert out_exact[f'{name}/mean_F1'] == pytest.approx(comp['mean_F1'] * 100, abs=1e-12)
        # smiyc: the benchmark's bins of the float16 scores, its threshold, its components.
        bins = [frame_pixel_bins(sc.astype(np.float16), lb) for sc, lb in arrays]
        pix = merge_pixel_bins(bins)
        assert out_both[f'smiyc/{name}/AuPRC'] == pix.average_precision * 100
        assert out_both[f'smiyc/{name}/FPR95'] == pix.fpr_at_95_tpr * 100
        assert out_both[f'smiyc/{name}/AUROC'] == pix.auroc * 100
        seg = merge_components([frame_components(sc.astype(np.float16), lb,
                                                 pix.best_f1_threshold, 'obstacle')
                                for sc, lb in arrays], pix.best_f1_threshold)
        assert out_both[f'smiyc/{name}/sIoU'] == seg.siou_gt * 100
        assert out_both[f'smiyc/{name}/mean_F1'] == seg.f1_mean * 100
        assert out_both[f'smiyc/{name}/F1@0.50'] == seg.f1['50'] * 100
    rows = {(t['protocol'], t['score']): t for t in both.last_tables}
    assert set(rows) == {(p, n) for p in ('exact', 'smiyc') for n in ('msp', 'rba')}
    labelled = sum(int((s.gt_sem_seg.data != 255).sum()) for s in samples)
    assert all(t['frames'] == 6 and t['labelled_pixels'] == labelled for t in rows.values())


def test_metric_keeps_no_pixels_in_memory_and_cleans_up_on_error(tmp_path):
    metric = METRICS.build(dict(type='AnomalyMetric', protocol=['exact', 'smiyc'],
                                component_metrics=True, spill_dir=str(tmp_path)))
    metric.process({}, [s.to_dict() for s in _samples(1)])

    def arrays(obj):
        if isinstance(obj, np.ndarray):
            yield obj
        elif isinstance(obj, dict):
            for v in obj.values():
                yield from arrays(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                yield from arrays(v)
        elif hasattr(obj, '__dataclass_fields__'):
            for k in obj.__dataclass_fields__:
                yield from arrays(getattr(obj, k))

    sizes = [a.size for a in arrays(metric.results)]
    assert sizes and max(sizes) <= 769  # bucket tables and SMIYC bins, never a pixel array
    bad = _samples(2, n=1)[0]
    bad.gt_sem_seg.data[0, 0, 0] = 7
    with pytest.raises(ValueError, match=r'frame_0\.png.*\[7\]'):
        metric.process({}, [bad.to_dict()])
    assert not os.listdir(tmp_path) and not metric.results


def test_protocol_and_track_errors():
    with pytest.raises(ValueError, match="protocol must be one of \\['exact', 'smiyc'\\]"):
        METRICS.build(dict(type='AnomalyMetric', protocol='leaderboard'))
    with pytest.raises(ValueError, match='distinct'):
        METRICS.build(dict(type='AnomalyMetric', protocol=['exact', 'exact']))
    with pytest.raises(ValueError, match='unknown track'):
        METRICS.build(dict(type='AnomalyMetric', protocol='smiyc', track='lane'))
    with pytest.raises(ValueError, match='95% TPR only'):
        METRICS.build(dict(type='AnomalyMetric', protocol='smiyc', tpr_level=0.9))
    with pytest.raises(ValueError, match='merge_chunk_entries'):
        METRICS.build(dict(type='AnomalyMetric', merge_chunk_entries=0))


def test_smiyc_float16_overflow_names_the_frame():
    sample = _samples(3, n=1)[0]
    sample.anomaly_scores = PixelData(msp=torch.full((1, 40, 48), 1e6))
    metric = METRICS.build(dict(type='AnomalyMetric', protocol='smiyc'))
    with pytest.raises(ValueError, match=r"score 'msp', image frame_0\.png.*smiyc_float16"):
        metric.process({}, [sample.to_dict()])
    relaxed = METRICS.build(dict(type='AnomalyMetric', protocol='smiyc', smiyc_float16=False))
    relaxed.process({}, [sample.to_dict()])
