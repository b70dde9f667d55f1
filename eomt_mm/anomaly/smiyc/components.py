"""Component-level metrics of the SegmentMeIfYouCan (SMIYC) benchmark's own evaluator.

Reimplements (from its definition, not copied) ``SegEval-AnomalyTrack`` / ``SegEval-ObstacleTrack``
of SegmentMeIfYouCan/road-anomaly-benchmark (``road_anomaly_benchmark/metrics/
instance_segmentation.py``: ``default_instancer``, ``segment_metrics``, ``MetricSegment``). Per
frame, with the threshold ``t`` (the pixel best-F1 threshold of :mod:`.pixel`):

1. prediction = ``score > t`` outside void; GT = ``label == 1``; both split into 8-connected
   components over the whole frame;
2. predicted components of fewer than ``min_pred_size`` pixels are dropped (sizes counted before
   step 3); GT components of fewer than ``min_gt_size`` pixels become void. The benchmark applies
   the GT size filter to label 0 too: the connected "background" (every non-anomaly pixel, void
   included) of a frame with fewer than ``min_gt_size`` such pixels becomes void as well;
3. everything is restricted to the remaining region of interest (label != 255);
4. for a GT component ``k`` with the predicted components ``K^`` touching it:
   ``sIoU = |k ∩ K^| / (|K^| + |k| - |k ∩ K^| - A)``, ``A`` = pixels of ``K^`` in other GT
   components, which simplifies to ``|k ∩ K^| / (|k| + |K^ ∩ background|)``; ``sIoU_pred`` of a
   predicted component is the same with the roles swapped; its PPV is the fraction of it inside GT;
5. over the dataset, at each ``tau`` in ``linspace(0.25, 0.75, 11)``: TP = GT components with
   sIoU >= tau, FN = the others, FP = predicted components with PPV < tau;
   ``F1(tau) = 2 TP / (2 TP + FN + FP)``; ``f1_mean`` averages the 11 values.

Everything is computed from one contingency table of (GT component, predicted component) pixel
pairs per frame instead of the benchmark's mask comparisons per component (same integers, so the
same ratios). Per-frame results (:class:`FrameComponents`) hold one float per component.

Thresholding follows numpy 1.x (which the benchmark pins): ``score > t`` is evaluated in the
score dtype (``t`` rounded to it), e.g. in float16 for the files of a submission.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Sequence, Tuple

import numpy as np
from scipy import ndimage

from .checks import check_frame

#: (min_pred_size, min_gt_size) in pixels of each SMIYC track.
TRACKS: Dict[str, Tuple[int, int]] = {'anomaly': (500, 100), 'obstacle': (50, 10)}
#: sIoU / PPV thresholds whose F1 values are averaged.
F1_TAUS = np.linspace(0.25, 0.75, 11)
#: The thresholds reported on their own (``f1_25``, ``f1_50``, ``f1_75``).
REPORTED_TAUS = {'25': 0, '50': 5, '75': 10}

_EIGHT_CONNECTED = np.ones((3, 3), dtype=np.uint8)


def track_sizes(track: str) -> Tuple[int, int]:
    """``(min_pred_size, min_gt_size)`` of a SMIYC track.

    Args:
        track: ``'anomaly'`` (500 / 100 px) or ``'obstacle'`` (50 / 10 px).

    Returns:
        The two minimum component sizes in pixels.
    """
    if track not in TRACKS:
        raise ValueError(f'unknown SMIYC track {track!r}; expected one of {sorted(TRACKS)}')
    return TRACKS[track]


@dataclasses.dataclass(frozen=True)
class FrameComponents:
    """One frame's component statistics (one float per component, in label order).

    Attributes:
        siou_gt: ``[G]`` sIoU of each kept GT component.
        siou_pred: ``[P]`` sIoU of each kept predicted component.
        ppv_pred: ``[P]`` PPV (precision) of each kept predicted component.
    """

    siou_gt: np.ndarray
    siou_pred: np.ndarray
    ppv_pred: np.ndarray


@dataclasses.dataclass(frozen=True)
class SmiycComponentResult:
    """Dataset-level component metrics of one SMIYC track (fractions, not percent).

    Attributes:
        siou_gt: mean sIoU over all GT components (the leaderboard's "sIoU gt").
        siou_pred: mean sIoU over all predicted components.
        ppv: mean PPV over all predicted components (the leaderboard's "PPV").
        f1_mean: F1 averaged over the 11 taus (the leaderboard's "mean F1").
        f1: F1 at tau 0.25 / 0.5 / 0.75, keyed ``'25'``, ``'50'``, ``'75'``.
        tp: TP at those taus; ``fn`` and ``fp`` likewise.
        fn: FN at those taus.
        fp: FP at those taus.
        num_gt: GT components counted.
        num_pred: predicted components counted.
        threshold: the score threshold used.
    """

    siou_gt: float
    siou_pred: float
    ppv: float
    f1_mean: float
    f1: Dict[str, float]
    tp: Dict[str, int]
    fn: Dict[str, int]
    fp: Dict[str, int]
    num_gt: int
    num_pred: int
    threshold: float


def _comparison_dtype(score_dtype: np.dtype, threshold: float) -> np.dtype:
    """Dtype in which numpy 1.x evaluates ``score > threshold`` (value-based casting).

    numpy 1.x casts a scalar to the smallest float type that holds its value without overflow
    and promotes that with the array's dtype: float32 scores are compared in float32, float16
    scores in float16 (the threshold rounded to it) unless the threshold exceeds float16's range.
    """
    if abs(threshold) <= float(np.finfo(np.float16).max):
        scalar_dtype = np.float16
    elif abs(threshold) <= float(np.finfo(np.float32).max):
        scalar_dtype = np.float32
    else:
        scalar_dtype = np.float64
    return np.promote_types(score_dtype, scalar_dtype)


def frame_components(score: np.ndarray, label: np.ndarray, threshold: float,
                     track: str) -> FrameComponents:
    """Component statistics of one frame, as the benchmark's ``MetricSegment.process_frame``.

    Args:
        score: ``[H, W]`` floating anomaly scores (float16 for the leaderboard's figures).
        label: ``[H, W]`` labels, 0 = inlier, 1 = anomaly, 255 = void.
        threshold: pixels with ``score > threshold`` are predicted anomalous (the
            ``best_f1_threshold`` of :func:`.pixel.merge_pixel_bins`).
        track: ``'anomaly'`` or ``'obstacle'`` (its component size filters).

    Returns:
        :class:`FrameComponents`.
    """
    min_pred_size, min_gt_size = track_sizes(track)
    score, label = check_frame(score, label)
    threshold = float(threshold)
    if not np.isfinite(threshold):
        raise ValueError(f'threshold must be finite, got {threshold}')

    compare_dtype = _comparison_dtype(score.dtype, threshold)
    valid = label != 255
    predicted = (score.astype(compare_dtype, copy=False) > compare_dtype.type(threshold)) & valid
    gt_ids, _ = ndimage.label(label == 1, _EIGHT_CONNECTED)
    pred_ids, _ = ndimage.label(predicted, _EIGHT_CONNECTED)

    pred_sizes = np.bincount(pred_ids.ravel())
    kept_pred = pred_sizes >= min_pred_size
    kept_pred[0] = False
    pred_ids = np.where(kept_pred[pred_ids], pred_ids, 0)

    # GT components (and, as in the benchmark, the background as "component 0") below the size
    # filter become void.
    gt_sizes = np.bincount(gt_ids.ravel())
    roi = valid & ~(gt_sizes < min_gt_size)[gt_ids]
    gt_in_roi = gt_ids[roi].astype(np.int64)
    pred_in_roi = pred_ids[roi].astype(np.int64)

    # Contingency table of (GT id, predicted id) pixel pairs inside the ROI.
    width = int(pred_in_roi.max(initial=0)) + 1
    pairs, counts = np.unique(gt_in_roi * width + pred_in_roi, return_counts=True)
    pair_gt, pair_pred = pairs // width, pairs % width
    num_gt_ids = int(gt_in_roi.max(initial=0)) + 1
    gt_total = np.bincount(pair_gt, counts, minlength=num_gt_ids)
    pred_total = np.bincount(pair_pred, counts, minlength=width)
    gt_background = np.bincount(pair_gt[pair_pred == 0], counts[pair_pred == 0],
                                minlength=num_gt_ids)      # pixels of a GT id not predicted
    pred_background = np.bincount(pair_pred[pair_gt == 0], counts[pair_gt == 0],
                                  minlength=width)         # pixels of a predicted id not in GT
    overlap = (pair_gt > 0) & (pair_pred > 0)
    og, op, oc = pair_gt[overlap], pair_pred[overlap], counts[overlap]
    gt_inter = np.bincount(og, oc, minlength=num_gt_ids)
    pred_inter = np.bincount(op, oc, minlength=width)
    gt_touch = np.bincount(og, pred_background[op], minlength=num_gt_ids)
    pred_touch = np.bincount(op, gt_background[og], minlength=width)

    gt_present = np.unique(gt_in_roi[gt_in_roi > 0])
    pred_present = np.unique(pred_in_roi[pred_in_roi > 0])
    siou_gt = gt_inter[gt_present] / (gt_total[gt_present] + gt_touch[gt_present])
    siou_pred = pred_inter[pred_present] / (pred_total[pred_present] + pred_touch[pred_present])
    ppv_pred = pred_inter[pred_present] / pred_total[pred_present]
    return FrameComponents(siou_gt.astype(np.float64), siou_pred.astype(np.float64),
                           ppv_pred.astype(np.float64))


def _mean(values: Sequence[np.ndarray]) -> float:
    count = sum(len(v) for v in values)
    return float(sum(float(np.sum(v)) for v in values) / count) if count else float('nan')


def merge_components(frames: Sequence[FrameComponents], threshold: float) -> SmiycComponentResult:
    """Dataset-level component metrics, as the benchmark's ``MetricSegment.aggregate``.

    Args:
        frames: per-frame results of :func:`frame_components` (any order).
        threshold: the threshold they were computed with (reported only).

    Returns:
        :class:`SmiycComponentResult`. Means over zero components and F1 over zero components
        are NaN (the benchmark divides by zero there).
    """
    frames = list(frames)
    if not frames:
        raise ValueError('no frame to evaluate: merge_components got an empty list')
    for index, frame in enumerate(frames):
        if not isinstance(frame, FrameComponents):
            raise TypeError(f'frames[{index}] is a {type(frame).__name__}, expected '
                            'FrameComponents (see frame_components)')
    siou_gt = [f.siou_gt for f in frames]
    ppv = [f.ppv_pred for f in frames]
    f1_values, tp_at, fn_at, fp_at = [], {}, {}, {}
    for index, tau in enumerate(F1_TAUS):
        tp = sum(int(np.count_nonzero(s >= tau)) for s in siou_gt)
        fn = sum(int(np.count_nonzero(s < tau)) for s in siou_gt)
        fp = sum(int(np.count_nonzero(p < tau)) for p in ppv)
        f1_values.append(2 * tp / (2 * tp + fn + fp) if 2 * tp + fn + fp else float('nan'))
        for key, reported in REPORTED_TAUS.items():
            if reported == index:
                tp_at[key], fn_at[key], fp_at[key] = tp, fn, fp
    return SmiycComponentResult(
        siou_gt=_mean(siou_gt),
        siou_pred=_mean([f.siou_pred for f in frames]),
        ppv=_mean(ppv),
        f1_mean=float(sum(f1_values) / len(F1_TAUS)),
        f1={key: float(f1_values[index]) for key, index in REPORTED_TAUS.items()},
        tp=tp_at, fn=fn_at, fp=fp_at,
        num_gt=sum(len(s) for s in siou_gt),
        num_pred=sum(len(p) for p in ppv),
        threshold=float(threshold))
