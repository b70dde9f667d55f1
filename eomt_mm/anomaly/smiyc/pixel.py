"""Pixel metrics of the SegmentMeIfYouCan (SMIYC) benchmark's own evaluator.

The leaderboard's pixel metric (``PixBinaryClass`` in SegmentMeIfYouCan/road-anomaly-benchmark,
``road_anomaly_benchmark/metrics/pixel_classification.py`` and ``pixel_classification_curves.py``)
is not the exact pooled ranking of all pixels. Per frame it

1. takes the scores inside the region of interest (label != 255);
2. places bin edges at ``min(num_bins // 2, n)`` (384) evenly spaced quantiles (numpy's default "linear"
   quantile) of the positive and of the negative scores, plus ``vmin - eps`` and ``vmax + eps``
   with ``eps = max(0.01 * (vmax - vmin), 0.01)``, de-duplicated;
3. counts positives and negatives per bin (``np.histogram``: ``[e_i, e_i+1)``, the last bin closed);
   each bin becomes one threshold, its lower edge (scores at or above it count as anomalous).

The dataset's curve concatenates the bins of all frames, sorts them by threshold (descending),
accumulates the counts, keeps for every run of equal thresholds only its last entry (plus the
first entry of the whole curve), adds the (0, 0) start point, and reads from it AP
(``sum(diff(recall) * precision[1:])``, the step sum scikit-learn uses), FPR at the first point
with TPR >= 0.95, AUROC (trapezoids) and the best-F1 threshold, which its component metrics use.

This module reimplements that computation (numpy only; written from the description above, not
copied) with these properties:

* per-frame results are small and mergeable: :class:`FramePixelBins` holds at most
  ``num_bins + 1`` bins (769 for the leaderboard's 768), three numbers each, i.e. at most
  ``3 * 769 * 8`` bytes as float64 (:meth:`FramePixelBins.pack`), whatever the frame size, so
  evaluation memory does not grow with pixels and distributed ranks send each frame's result
  cheaply;
* the dtype rules of numpy 1.x (the benchmark pins numpy 1.23) are applied explicitly, so the bins
  do not depend on the numpy version this project runs: quantile interpolation in float64 with the
  neighbour difference taken in the score dtype, ``eps`` in float64;
* the curve is deterministic: where several frames share the dataset's highest threshold, the
  benchmark's first curve point depends on the order of its unstable ``argsort`` (and on the order
  in which its worker pool returns frames). Here the sort is stable and descending, so the tied
  bin of the frame that comes first in the order given to :func:`merge_pixel_bins` comes first,
  which is what the sort of numpy 1.23 (pinned by the benchmark) usually gives too;
* a frame without any labelled pixel contributes no bin (the benchmark raises on one, which is why
  it excludes LostAndFound's invalid frames by index).

The leaderboard evaluates the float16 files of a submission (``Evaluation.save_output`` casts to
float16): to reproduce its figures, pass ``score.astype(np.float16)``.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from .checks import check_frame

#: Bins per frame of the leaderboard metric (``PixBinaryClass``).
SMIYC_NUM_BINS = 768
#: TPR at which the false positive rate is reported.
TPR_TARGET = 0.95


@dataclasses.dataclass(frozen=True)
class FramePixelBins:
    """One frame's binned pixel statistics (the benchmark's per-frame confusion matrices).

    At most ``num_bins + 1`` bins whatever the number of pixels: ``3 * (num_bins + 1)`` numbers
    (769 bins, 18,456 bytes as float64, for the leaderboard's 768).

    Attributes:
        thresholds: ``[B]`` float64 lower bin edges, descending; a pixel counts as predicted
            anomalous at a threshold when its score is at least that edge.
        positives: ``[B]`` int64 number of anomaly pixels in each bin.
        negatives: ``[B]`` int64 number of inlier pixels in each bin.
    """

    thresholds: np.ndarray
    positives: np.ndarray
    negatives: np.ndarray

    @property
    def num_positives(self) -> int:
        """Anomaly pixels of the frame (inside the region of interest)."""
        return int(self.positives.sum())

    @property
    def num_negatives(self) -> int:
        """Inlier pixels of the frame (inside the region of interest)."""
        return int(self.negatives.sum())

    def pack(self) -> np.ndarray:
        """``[3, B]`` float64 array (counts are exact in float64) for gathering across ranks."""
        return np.stack([self.thresholds, self.positives.astype(np.float64),
                         self.negatives.astype(np.float64)])

    @classmethod
    def unpack(cls, packed: np.ndarray) -> 'FramePixelBins':
        """Inverse of :meth:`pack`.

        Args:
            packed: ``[3, B]`` array made by :meth:`pack`.

        Returns:
            The frame's bins.
        """
        packed = np.asarray(packed)
        if packed.ndim != 2 or packed.shape[0] != 3:
            raise ValueError(f'packed frame bins must have shape [3, B], got {packed.shape}')
        return cls(packed[0].astype(np.float64), packed[1].astype(np.int64),
                   packed[2].astype(np.int64))


@dataclasses.dataclass(frozen=True)
class SmiycPixelResult:
    """Dataset-level pixel metrics of the SMIYC protocol (fractions, not percent).

    Attributes:
        average_precision: area under the precision-recall curve (``area_PRC``).
        fpr_at_95_tpr: false positive rate at the first curve point with TPR >= 0.95.
        tpr95_threshold: the threshold of that point.
        auroc: area under the ROC curve (``area_ROC``).
        best_f1: highest pixel F1 along the curve.
        best_f1_threshold: its threshold; the component metrics binarise with
            ``score > best_f1_threshold``.
        num_positives: anomaly pixels in the region of interest, all frames.
        num_negatives: inlier pixels in the region of interest, all frames.
        num_frames: frames merged (including frames without a labelled pixel).
    """

    average_precision: float
    fpr_at_95_tpr: float
    tpr95_threshold: float
    auroc: float
    best_f1: float
    best_f1_threshold: float
    num_positives: int
    num_negatives: int
    num_frames: int


def _linear_quantiles(sorted_values: np.ndarray, count: int) -> np.ndarray:
    """``np.quantile(values, np.linspace(0, 1, count))`` as numpy 1.23 computes it.

    numpy's "linear" method interpolates ``a + (b - a) * g`` (``b - (b - a) * (1 - g)`` for
    ``g >= 0.5``) with ``b - a`` taken in the array's dtype and the rest in float64. Written out
    so that the bin edges follow the numpy the benchmark pins, whichever numpy runs here (the
    dtype rules of ``np.quantile`` are not part of its documented interface).

    Args:
        sorted_values: ascending scores of one class (float16/32/64), at least one.
        count: number of evenly spaced quantile levels in [0, 1].

    Returns:
        ``[count]`` float64 quantiles.
    """
    n = sorted_values.shape[0]
    levels = np.linspace(0.0, 1.0, count)
    virtual = (n - 1) * levels
    below = np.floor(virtual)
    gamma = virtual - below
    lower = below.astype(np.intp)
    upper = lower + 1
    at_end = virtual >= n - 1
    lower[at_end] = n - 1
    upper[at_end] = n - 1
    a = sorted_values[lower]
    b = sorted_values[upper]
    diff = (b - a).astype(np.float64)  # in the score dtype, as numpy 1.x does
    out = a.astype(np.float64) + diff * gamma
    upper_half = gamma >= 0.5
    out[upper_half] = (b[upper_half].astype(np.float64)
                       - diff[upper_half] * (1.0 - gamma[upper_half]))
    return out


def _bin_counts(sorted_values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """``np.histogram(values, bins=edges)[0]`` for ascending values (last bin closed)."""
    values = sorted_values.astype(np.float64)
    cumulative = np.concatenate([np.searchsorted(values, edges[:-1], side='left'),
                                 np.searchsorted(values, edges[-1:], side='right')])
    return np.diff(cumulative).astype(np.int64)


def frame_pixel_bins(score: np.ndarray, label: np.ndarray,
                     num_bins: int = SMIYC_NUM_BINS) -> FramePixelBins:
    """Bin one frame's scores the way the benchmark's ``PixBinaryClass`` does.

    Args:
        score: ``[H, W]`` floating anomaly scores (higher = more anomalous), finite inside the
            region of interest. Their dtype matters (see the module docstring): the leaderboard
            sees float16.
        label: ``[H, W]`` integer labels, 0 = inlier, 1 = anomaly, 255 = void.
        num_bins: quantile levels per frame, half for each class (768 on the leaderboard).

    Returns:
        The frame's bins; none for a frame without a labelled pixel.
    """
    score, label = check_frame(score, label)
    if not isinstance(num_bins, (int, np.integer)) or num_bins < 2:
        raise ValueError(f'num_bins must be an integer >= 2, got {num_bins!r}')
    roi = label != 255
    values = score[roi]
    if values.size == 0:
        empty = np.zeros(0, np.int64)
        return FramePixelBins(np.zeros(0, np.float64), empty, empty.copy())
    positive = label[roi] == 1
    positives = np.sort(values[positive])
    negatives = np.sort(values[~positive])

    vmin, vmax = values.min(), values.max()
    value_range = np.float64(vmax - vmin)  # difference in the score dtype, as the benchmark
    eps = max(value_range * 1e-2, 1e-2)
    parts = [np.array([np.float64(vmin) - eps, np.float64(vmax) + eps])]
    for class_values in (positives, negatives):
        if class_values.size:
            parts.append(_linear_quantiles(class_values, min(num_bins // 2, class_values.size)))
    edges = np.unique(np.concatenate(parts))

    # Reverse: the curve runs from high to low thresholds; each bin's threshold is its lower edge.
    return FramePixelBins(thresholds=edges[:-1][::-1].copy(),
                          positives=_bin_counts(positives, edges)[::-1].copy(),
                          negatives=_bin_counts(negatives, edges)[::-1].copy())


def merge_pixel_bins(frames: Sequence[FramePixelBins]) -> SmiycPixelResult:
    """Dataset-level SMIYC pixel metrics from per-frame bins.

    Args:
        frames: per-frame bins in dataset order (the order only matters where several frames
            share the highest threshold, see the module docstring; gather frames from several
            ranks by their dataset index so the result does not depend on the number of ranks).

    Returns:
        :class:`SmiycPixelResult`.
    """
    frames = list(frames)
    if not frames:
        raise ValueError('no frame to evaluate: merge_pixel_bins got an empty list')
    for index, frame in enumerate(frames):
        if not isinstance(frame, FramePixelBins):
            raise TypeError(f'frames[{index}] is a {type(frame).__name__}, expected '
                            'FramePixelBins (see frame_pixel_bins / FramePixelBins.unpack)')
    thresholds = np.concatenate([f.thresholds for f in frames])
    positives = np.concatenate([f.positives for f in frames])
    negatives = np.concatenate([f.negatives for f in frames])
    num_pos = int(positives.sum())
    num_neg = int(negatives.sum())
    if num_pos == 0 or num_neg == 0:
        raise ValueError(f'the SMIYC pixel metrics need anomaly and inlier pixels; the '
                         f'{len(frames)} frames have {num_pos} anomaly and {num_neg} inlier '
                         'pixels in their regions of interest (label 1 / label 0)')

    # Descending, ties in frame order (see the module docstring).
    order = np.argsort(-thresholds, kind='stable')
    thresholds = thresholds[order]
    tp = np.cumsum(positives[order].astype(np.float64))
    fp = np.cumsum(negatives[order].astype(np.float64))

    # Collapse runs of equal thresholds (frames share edges) onto their last entry, where every
    # frame's bin at that threshold has been counted; the curve's first entry is kept as is.
    keep = np.concatenate([[0], np.nonzero(thresholds[:-1] != thresholds[1:])[0],
                           [thresholds.size - 1]])
    tp, fp, thresholds = tp[keep], fp[keep], thresholds[keep]
    if tp[0] != 0 or fp[0] != 0:  # start at (0, 0), above every score
        tp = np.concatenate([[0.0], tp])
        fp = np.concatenate([[0.0], fp])
        thresholds = np.concatenate([[float(thresholds.max()) + 1], thresholds])
    fn = num_pos - tp

    tpr = tp / num_pos
    fpr = fp / num_neg
    predicted = tp + fp
    precision = np.ones_like(tp)
    precision[predicted > 0] = tp[predicted > 0] / predicted[predicted > 0]
    f1 = 2 * tp / (2 * tp + fp + fn)

    tpr95_index = int(np.searchsorted(tpr, TPR_TARGET))  # reached: the curve ends at TPR 1
    best = int(np.nanargmax(f1))
    return SmiycPixelResult(
        average_precision=float(np.sum(np.diff(tpr) * precision[1:])),
        fpr_at_95_tpr=float(fpr[tpr95_index]),
        tpr95_threshold=float(thresholds[tpr95_index]),
        auroc=float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0)),
        best_f1=float(f1[best]),
        best_f1_threshold=float(thresholds[best]),
        num_positives=num_pos,
        num_negatives=num_neg,
        num_frames=len(frames))
