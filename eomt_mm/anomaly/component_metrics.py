"""SegmentMeIfYouCan component-level metrics: sIoU, PPV and mean F1.

The exact protocol's component metrics, with the definitions of the SegmentMeIfYouCan benchmark
(Chan et al., NeurIPS 2021 Datasets and Benchmarks; https://segmentmeifyoucan.com), evaluated at
the exact pooled best-F1 threshold. (``protocol='smiyc'`` uses :mod:`.smiyc.components`, the
benchmark evaluator's own variant, at its binned threshold.)

* the score map is binarised with ``score > threshold`` (the pixel best-F1 threshold) inside the
  region of interest (label != 255);
* components are 8-connected (``scipy.ndimage.label`` with a 3x3 structure);
* predicted components smaller than ``min_pred_size`` pixels are dropped; ground-truth components
  smaller than ``min_gt_size`` pixels become void, and everything is then restricted to the
  (possibly shrunk) region of interest;
* sIoU of a GT component ``k``: ``|k ∩ K^| / (|K^| + |k| - |k ∩ K^| - A)`` with ``K^`` the
  predicted components touching ``k`` and ``A`` the pixels of ``K^`` inside other GT components;
* PPV of a predicted component: the fraction of it inside GT components;
* at each ``tau`` in ``linspace(0.25, 0.75, 11)``: TP = GT components with sIoU >= tau, FN = the
  others, FP = predicted components with PPV < tau, summed over all frames;
  ``F1(tau) = 2 TP / (2 TP + FN + FP)``.

mmseg / mmengine have no component-level metric, hence this module. The contingency between GT
and predicted components is computed with one ``np.unique`` over pixel pairs instead of one mask
comparison per component.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Iterable, List

import numpy as np
from scipy import ndimage

from .smiyc.components import TRACKS

#: Size filters (predicted component min size, GT component min size) per track: the benchmark's
#: one table.
TRACK_SIZE_FILTERS = TRACKS
#: The sIoU / PPV thresholds of the F1 average.
F1_TAUS = np.linspace(0.25, 0.75, 11)

_EIGHT_CONNECTED = np.ones((3, 3), dtype=np.uint8)


@dataclasses.dataclass
class FrameComponentStats:
    """Per-frame component statistics.

    Attributes:
        siou_gt: sIoU of every (kept) ground-truth component.
        ppv_pred: PPV of every (kept) predicted component.
    """

    siou_gt: np.ndarray
    ppv_pred: np.ndarray


def track_size_filters(track: str) -> tuple:
    """``(min_pred_size, min_gt_size)`` of a SegmentMeIfYouCan track.

    Args:
        track: 'anomaly' (500 / 100 px) or 'obstacle' (50 / 10 px).

    Returns:
        The two minimum sizes.
    """
    if track not in TRACK_SIZE_FILTERS:
        raise ValueError(f'unknown track {track!r}; expected one of {sorted(TRACK_SIZE_FILTERS)}')
    return TRACK_SIZE_FILTERS[track]


def frame_component_stats(score: np.ndarray, label: np.ndarray, threshold: float,
                          min_pred_size: int, min_gt_size: int,
                          ignore_index: int = 255) -> FrameComponentStats:
    """sIoU of the GT components and PPV of the predicted components of one frame.

    Args:
        score: ``[H, W]`` anomaly scores (higher = more anomalous).
        label: ``[H, W]`` labels in {0, 1, ignore_index}.
        threshold: pixels with ``score > threshold`` are predicted anomalous.
        min_pred_size: predicted components with fewer pixels are dropped.
        min_gt_size: GT components with fewer pixels become void.
        ignore_index: void label.

    Returns:
        :class:`FrameComponentStats`.
    """
    score = np.asarray(score)
    label = np.asarray(label)
    if score.ndim != 2 or score.shape != label.shape:
        raise ValueError(f'score {score.shape} and label {label.shape} must be equal 2-D shapes')
    roi = label != ignore_index
    gt_cc, n_gt = ndimage.label(label == 1, structure=_EIGHT_CONNECTED)
    pred_cc, n_pred = ndimage.label((score > threshold) & roi, structure=_EIGHT_CONNECTED)

    pred_sizes = np.bincount(pred_cc.ravel(), minlength=n_pred + 1)
    small_pred = pred_sizes < min_pred_size
    small_pred[0] = False
    if small_pred.any():
        pred_cc[small_pred[pred_cc]] = 0
    gt_sizes = np.bincount(gt_cc.ravel(), minlength=n_gt + 1)
    small_gt = gt_sizes < min_gt_size
    small_gt[0] = False
    if small_gt.any():
        roi &= ~small_gt[gt_cc]

    gt_roi = gt_cc[roi].astype(np.int64)
    pred_roi = pred_cc[roi].astype(np.int64)
    # Sizes inside the region of interest (predicted components may lose pixels to voided GT).
    pred_area = np.bincount(pred_roi, minlength=n_pred + 1)
    gt_area = np.bincount(gt_roi, minlength=n_gt + 1)
    pairs, counts = np.unique(gt_roi * (n_pred + 1) + pred_roi, return_counts=True)
    pair_gt, pair_pred = np.divmod(pairs, n_pred + 1)
    overlap = (pair_gt > 0) & (pair_pred > 0)
    # Pixels of each predicted component that lie inside any GT component.
    pred_in_gt = np.bincount(pair_pred[overlap], weights=counts[overlap], minlength=n_pred + 1)

    siou = []
    for gt_id in np.flatnonzero(gt_area[1:]) + 1:
        rows = overlap & (pair_gt == gt_id)
        touching = pair_pred[rows]
        intersection = counts[rows].sum()
        other_gt = pred_in_gt[touching].sum() - intersection
        union = pred_area[touching].sum() + gt_area[gt_id] - intersection - other_gt
        siou.append(intersection / union)
    pred_ids = np.flatnonzero(pred_area[1:]) + 1
    ppv = pred_in_gt[pred_ids] / pred_area[pred_ids]
    return FrameComponentStats(np.asarray(siou, dtype=np.float64), ppv.astype(np.float64))


def aggregate_component_stats(frames: Iterable[FrameComponentStats],
                              taus: np.ndarray = F1_TAUS) -> Dict[str, float]:
    """Dataset-level component metrics (fractions, not percent).

    Args:
        frames: per-frame statistics.
        taus: sIoU / PPV thresholds averaged by ``mean_F1``.

    Returns:
        dict with 'sIoU' (mean over all GT components), 'PPV' (mean over all predicted
        components), 'mean_F1' (mean over ``taus`` of the pooled F1) and 'F1@<tau>' for 0.25,
        0.5, 0.75. NaN where there is nothing to average.
    """
    frames = list(frames)
    siou = np.concatenate([f.siou_gt for f in frames]) if frames else np.zeros(0)
    ppv = np.concatenate([f.ppv_pred for f in frames]) if frames else np.zeros(0)
    nan = float('nan')
    out = {'sIoU': float(siou.mean()) if siou.size else nan,
           'PPV': float(ppv.mean()) if ppv.size else nan}
    f1s: List[float] = []
    for tau in taus:
        tp = int(np.count_nonzero(siou >= tau))
        fn = int(siou.size - tp)
        fp = int(np.count_nonzero(ppv < tau))
        denom = 2 * tp + fn + fp
        f1s.append(2 * tp / denom if denom else nan)
    out['mean_F1'] = float(np.mean(f1s)) if f1s else nan
    for tau, f1 in zip(taus, f1s):
        if round(float(tau), 6) in (0.25, 0.5, 0.75):
            out[f'F1@{float(tau):.2f}'] = f1
    return out
