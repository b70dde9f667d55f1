"""Exact pooled pixel metrics for anomaly segmentation: AuPRC, FPR at 95 % TPR, AUROC.

Why our own instead of scikit-learn / torchmetrics: scikit-learn (the reference protocol) argsorts
with int64 indices and builds several float64 arrays of the full pixel count per call (gigabytes at
1e8 pixels, three sorts for three metrics); torchmetrics decides per batch whether to apply a
sigmoid, which is unsafe for unbounded scores. The functions here are exact (same numbers as
scikit-learn within float64 rounding) and need one float32 sort of the pixels.

How: every quantity of the three curves at a threshold ``t`` (prediction = ``score >= t``) is a
function of ``tp(t) = #{positives >= t}`` and ``fp(t) = #{negatives >= t}``.

* Precision/recall only change at thresholds equal to a positive score, and average precision
  ``sum_i (R_i - R_{i-1}) P_i`` (scikit-learn ``average_precision_score``, ties grouped) gets a
  non-zero term only there. So AP = ``sum_v n_pos(v) / P * tp(v) / (tp(v) + fp(v))`` over the
  distinct positive scores ``v``.
* The trapezoid ROC area with tied scores grouped equals the Mann-Whitney statistic
  ``sum_v n_pos(v) * (#neg < v + #neg == v / 2) / (P * N)``, computed in exact integers.
* ``roc_curve``'s TPR first reaches the level at the largest distinct positive score ``v`` with
  ``tp(v) / P >= level``; the FPR there is ``fp(v) / N``.

With the negatives sorted once, ``#neg < v`` and ``#neg <= v`` are two ``searchsorted`` calls per
distinct positive score. Positives and negatives are kept as two float32 arrays (no label array,
no float64 copy of the pixels); the per-threshold work runs in bounded blocks.

:func:`pooled_pixel_metrics` holds all pixels in memory: the reference. ``AnomalyMetric`` uses
:mod:`.exact_store` instead (frames spilled to disk, merged in bounded chunks); both feed the
same :class:`CurveAccumulator`, so they agree bit for bit.
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional, Tuple

import numpy as np

# Distinct positive scores handled per block: bounds the int64 / float64 temporaries to a few MB
# whatever the dataset size. Also fixes the summation order of AP (see CurveAccumulator).
_BLOCK = 1 << 20


@dataclasses.dataclass(frozen=True)
class PixelMetrics:
    """Pooled pixel metrics (fractions in [0, 1], not percent).

    Attributes:
        auprc: average precision (scikit-learn ``average_precision_score``).
        fpr_at_tpr: false-positive rate at the first threshold (scanning from the highest
            score down) whose true-positive rate is >= ``tpr_level``; equal to
            ``fpr[np.argmax(tpr >= tpr_level)]`` of scikit-learn's
            ``roc_curve(..., drop_intermediate=False)``. (With the default
            ``drop_intermediate=True`` scikit-learn may drop that very point when it is collinear
            with its neighbours and then report the next, larger FPR.)
        auroc: area under the ROC curve (scikit-learn ``roc_auc_score``).
        best_f1: the highest pixel F1 over all thresholds.
        best_f1_threshold: the lowest score threshold reaching ``best_f1`` (the one
            ``np.nanargmax`` picks on scikit-learn's ascending ``precision_recall_curve``).
        num_pos: number of anomaly pixels.
        num_neg: number of inlier pixels.
        tpr_level: the TPR level of ``fpr_at_tpr``.
    """

    auprc: float
    fpr_at_tpr: float
    auroc: float
    best_f1: float
    best_f1_threshold: float
    num_pos: int
    num_neg: int
    tpr_level: float = 0.95


class CurveAccumulator:
    """Accumulates AP, AUROC, FPR at a TPR level and the best F1 over distinct positive scores.

    The distinct positive scores ``v`` are fed in ascending order, in pieces of any size, each
    with ``n_pos(v)``, ``tp(v) = #{positives >= v}``, ``#{negatives < v}`` and
    ``#{negatives <= v}`` (see the module docstring for why these determine all metrics). The
    pieces are regrouped into fixed blocks of ``_BLOCK`` consecutive distinct values counted
    from the lowest one, so the floating-point sums depend only on the pooled pixels, never on
    how a caller cut them (in-memory sort, merged chunks of spilled frames, any number of ranks):
    every caller gets bit-identical results.

    Args:
        num_pos: number of anomaly pixels ``P``.
        num_neg: number of inlier pixels ``N``.
        tpr_level: TPR level of the FPR metric.
    """

    def __init__(self, num_pos: int, num_neg: int, tpr_level: float = 0.95) -> None:
        if not 0.0 < tpr_level <= 1.0:
            raise ValueError(f'tpr_level must be in (0, 1], got {tpr_level}')
        self.num_pos, self.num_neg, self.tpr_level = int(num_pos), int(num_neg), tpr_level
        self._pending: List[Tuple[np.ndarray, ...]] = []
        self._pending_size = 0
        self._ap_sum = 0.0
        # 2 * Mann-Whitney U as an exact Python integer (each block sum is below P * N * 2).
        self._auc_twice = 0
        self._fpr_fp: Optional[int] = None  # fp at the highest value reaching the TPR level
        self._best_f1, self._best_thr = -1.0, float('nan')

    def add(self, values: np.ndarray, pos_count: np.ndarray, tp: np.ndarray,
            neg_lt: np.ndarray, neg_le: np.ndarray) -> None:
        """Feeds the next distinct positive scores (all above those fed before).

        Args:
            values: float32 distinct positive scores, ascending.
            pos_count: int64 number of positives equal to each value.
            tp: int64 number of positives >= each value.
            neg_lt: int64 number of negatives < each value.
            neg_le: int64 number of negatives <= each value.
        """
        if not len(values):
            return
        self._pending.append((values, pos_count, tp, neg_lt, neg_le))
        self._pending_size += len(values)
        if self._pending_size >= _BLOCK:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        if not self._pending:
            return
        joined = [np.concatenate(parts) for parts in zip(*self._pending)]
        full = len(joined[0]) if final else len(joined[0]) // _BLOCK * _BLOCK
        for lo in range(0, full, _BLOCK):
            self._block(*(a[lo:min(lo + _BLOCK, full)] for a in joined))
        rest = [a[full:] for a in joined]
        self._pending = [tuple(rest)] if len(rest[0]) else []
        self._pending_size = len(rest[0])

    def _block(self, values, count, tp, neg_lt, neg_le) -> None:
        n_pos = self.num_pos
        fp = self.num_neg - neg_lt  # negatives >= value
        self._ap_sum += float(np.sum(count / n_pos * (tp / (tp + fp))))
        self._auc_twice += int(np.sum(count * neg_lt)) + int(np.sum(count * neg_le))
        # tp(v) / P >= level is evaluated in float64 exactly as scikit-learn's tps / tps[-1].
        reach = np.flatnonzero(tp / n_pos >= self.tpr_level)
        if reach.size:  # ascending values: the last one reaching the level is the highest
            self._fpr_fp = int(fp[reach[-1]])
        f1 = 2.0 * tp / (tp + fp + n_pos)
        i = int(np.argmax(f1))
        if f1[i] > self._best_f1:  # strict: keep the lowest threshold among equal maxima
            self._best_f1, self._best_thr = float(f1[i]), float(values[i])

    def result(self) -> PixelMetrics:
        """The metrics of everything fed so far (NaN where a class is empty)."""
        self._flush(final=True)
        n_pos, n_neg, nan = self.num_pos, self.num_neg, float('nan')
        if n_pos == 0:
            return PixelMetrics(nan, nan, nan, nan, nan, n_pos, n_neg, self.tpr_level)
        auroc = self._auc_twice / (2.0 * n_pos * n_neg) if n_neg else nan
        fpr = self._fpr_fp / n_neg if (n_neg and self._fpr_fp is not None) else nan
        return PixelMetrics(auprc=self._ap_sum, fpr_at_tpr=fpr, auroc=auroc,
                            best_f1=self._best_f1, best_f1_threshold=self._best_thr,
                            num_pos=n_pos, num_neg=n_neg, tpr_level=self.tpr_level)


def _check_scores(name: str, values: np.ndarray) -> np.ndarray:
    values = np.asarray(values)
    if values.dtype != np.float32:
        raise TypeError(f'{name} must be a float32 array (the protocol scores in float32), '
                        f'got {values.dtype}')
    values = values.reshape(-1)
    if values.size and not np.isfinite(values).all():
        raise ValueError(f'{name} contains NaN or infinite scores; anomaly scores must be finite')
    return values


def split_by_label(scores: np.ndarray, labels: np.ndarray,
                   ignore_index: Optional[int] = 255) -> Tuple[np.ndarray, np.ndarray]:
    """Splits scores into anomaly (label 1) and inlier (label 0) float32 arrays.

    Args:
        scores: float32 scores of any shape.
        labels: labels of the same shape: bool (True = anomaly) or integers in
            ``{0, 1, ignore_index}``.
        ignore_index: void label dropped from both outputs (ignored for bool labels).

    Returns:
        ``(positives, negatives)``: two new 1-D float32 arrays.

    Raises:
        ValueError: shapes differ or labels hold a value other than 0, 1, ``ignore_index``.
    """
    scores = np.asarray(scores)
    labels = np.asarray(labels)
    if scores.shape != labels.shape:
        raise ValueError(f'scores {scores.shape} and labels {labels.shape} differ in shape')
    if labels.dtype == np.bool_:
        return scores[labels], scores[~labels]
    pos_mask = labels == 1
    neg_mask = labels == 0
    if ignore_index is not None:
        bad = ~(pos_mask | neg_mask | (labels == ignore_index))
    else:
        bad = ~(pos_mask | neg_mask)
    if bad.any():
        found = np.unique(labels[bad])[:10].tolist()
        raise ValueError(f'labels must be 0 (inlier), 1 (anomaly) or {ignore_index} (void); '
                         f'found {found}')
    return scores[pos_mask], scores[neg_mask]


def pooled_pixel_metrics(positives: np.ndarray, negatives: np.ndarray,
                         tpr_level: float = 0.95, sorted_inputs: bool = False,
                         in_place: bool = False) -> PixelMetrics:
    """AuPRC, FPR at ``tpr_level`` TPR and AUROC of pooled pixels, exactly.

    Higher score = more anomalous; a pixel is predicted anomalous at threshold ``t`` when
    ``score >= t`` (scikit-learn's convention). Tied scores are grouped as in scikit-learn.

    Args:
        positives: float32 scores of the anomaly pixels (any shape, flattened).
        negatives: float32 scores of the inlier pixels.
        tpr_level: the TPR level for ``fpr_at_tpr`` (0.95 for FPR95).
        sorted_inputs: both arrays are already sorted ascending (skips the sorts).
        in_place: sort the given arrays in place instead of sorting copies (saves one copy of
            the pixels; the caller's arrays end up sorted).

    Returns:
        :class:`PixelMetrics`. A metric whose definition needs both classes is NaN when one is
        empty (scikit-learn raises or warns there).

    Raises:
        TypeError: an input is not float32.
        ValueError: NaN or infinite scores, or ``tpr_level`` outside (0, 1].
    """
    if not 0.0 < tpr_level <= 1.0:
        raise ValueError(f'tpr_level must be in (0, 1], got {tpr_level}')
    pos = _check_scores('positives', positives)
    neg = _check_scores('negatives', negatives)
    if not sorted_inputs:
        # ndarray.sort() runs numpy's SIMD quicksort in place: no index array, no float64.
        pos = pos if in_place else pos.copy()
        neg = neg if in_place else neg.copy()
        pos.sort()
        neg.sort()
    n_pos, n_neg = int(pos.size), int(neg.size)
    curve = CurveAccumulator(n_pos, n_neg, tpr_level)
    if n_pos == 0:
        return curve.result()
    # Position of the first element of each run of equal positive scores (ascending order).
    starts = np.flatnonzero(np.concatenate(([True], pos[1:] != pos[:-1])))
    for lo in range(0, starts.size, _BLOCK):
        first = starts[lo:lo + _BLOCK]
        stop = np.empty_like(first)
        stop[:-1] = first[1:]
        stop[-1] = starts[lo + _BLOCK] if lo + _BLOCK < starts.size else n_pos
        values = pos[first]
        curve.add(values, stop - first, n_pos - first,
                  np.searchsorted(neg, values, side='left'),
                  np.searchsorted(neg, values, side='right'))
    return curve.result()


def pixel_metrics_from_arrays(scores: np.ndarray, labels: np.ndarray,
                              ignore_index: Optional[int] = 255,
                              tpr_level: float = 0.95) -> PixelMetrics:
    """Convenience: :func:`split_by_label` then :func:`pooled_pixel_metrics`.

    Args:
        scores: float32 scores of any shape.
        labels: bool or ``{0, 1, ignore_index}`` labels of the same shape.
        ignore_index: void label.
        tpr_level: TPR level of the FPR metric.

    Returns:
        :class:`PixelMetrics`.
    """
    pos, neg = split_by_label(scores, labels, ignore_index)
    return pooled_pixel_metrics(pos, neg, tpr_level=tpr_level, in_place=True)

