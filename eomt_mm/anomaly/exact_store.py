"""The exact pooled pixel metrics in memory independent of the number of frames.

Holding every labelled pixel's score (what :func:`.pixel_metrics.pooled_pixel_metrics` needs) costs
4 bytes per pixel: 10 GB for the 2.5e9 pixels of the LostAndFound test split. Here each frame is
reduced on arrival and spilled to disk (:class:`.spill.SpillFolder`); the pooled curves are rebuilt
at the end by merging the frames in bounded chunks of the score axis.

Per frame and class (anomaly / inlier pixels), :func:`spill_sorted_runs` sorts the float32 scores
and writes them as ``uint32`` keys that sort like the floats (:func:`float_keys`), run-length
encoded (distinct key + ``uint32`` count) when that halves the size (ties: saturated scores,
quantised maps), else one key per pixel. In memory stays a :class:`SortedRuns` record: the segment
addresses and, for each of the 4,096 buckets of the key's top 12 bits that the frame touches, where
the bucket ends in the frame's sorted array (a few hundred bytes per frame).

:func:`exact_pixel_metrics` then plans chunks of consecutive buckets holding at most
``max_entries`` stored entries over all frames (:func:`chunk_plan`), walks them in ascending score
order, and per chunk reads each frame's slice (known from the bucket table: no search), merges the
slices into distinct keys with summed counts (``np.argsort(kind='stable')``: timsort merges the
pre-sorted slices) and feeds the distinct positive scores with their exact counts to the same
:class:`.pixel_metrics.CurveAccumulator` the in-memory reference uses, so the results are bit
for bit those of :func:`.pixel_metrics.pooled_pixel_metrics`. A bucket that alone exceeds the
budget is merged frame group by frame group into a running set, which can never outgrow the
2^20 distinct keys of one bucket. Resident memory: a few hundred MB for ``max_entries = 2^22``
whatever the number of frames (plus the per-frame records).

Ranks: every rank merges the chunk from its own frames, the per-rank merged chunks (bounded as
above) are exchanged (:class:`Exchange`), and every rank merges those: nobody ever holds more than
a chunk, and the result does not depend on how frames were spread over ranks.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable, List, Sequence, Tuple

import numpy as np

from .pixel_metrics import CurveAccumulator, PixelMetrics
from .spill import Segment, SpillFolder, read_segment

__all__ = ['SortedRuns', 'Exchange', 'float_keys', 'key_floats', 'spill_sorted_runs',
           'chunk_plan', 'merge_runs', 'exact_pixel_metrics']

#: Keys are bucketed by their top 12 bits (sign, exponent, 3 mantissa bits: 8 buckets a
#: power of two). One bucket spans 2^20 distinct float32 values.
BUCKET_SHIFT = 20
NUM_BUCKETS = 1 << (32 - BUCKET_SHIFT)
#: Default bound on the stored entries gathered per merge step (about 40 bytes each transient).
MAX_ENTRIES = 1 << 22

_SIGN = np.uint32(0x80000000)
_ALL = np.uint32(0xFFFFFFFF)


def float_keys(values: np.ndarray) -> np.ndarray:
    """Order-preserving ``uint32`` keys of finite float32 values (-0.0 and 0.0 share one key).

    Args:
        values: finite float32 array.

    Returns:
        ``uint32`` array: ``a < b`` iff ``key(a) < key(b)``.
    """
    # + 0.0 turns -0.0 into 0.0: one threshold for both, as in every comparison-based metric.
    bits = (np.asarray(values, dtype=np.float32) + np.float32(0.0)).view(np.uint32)
    return bits ^ np.where(bits & _SIGN, _ALL, _SIGN)


def key_floats(keys: np.ndarray) -> np.ndarray:
    """Inverse of :func:`float_keys`."""
    keys = np.asarray(keys, dtype=np.uint32)
    return (keys ^ np.where(keys & _SIGN, _SIGN, _ALL)).view(np.float32)


@dataclasses.dataclass(frozen=True)
class SortedRuns:
    """One frame's scores of one class, sorted and spilled.

    Attributes:
        keys: ascending :func:`float_keys` (distinct when ``counts`` is set).
        counts: pixels per key, or None when ``keys`` holds one key per pixel.
        num_pixels: pixels of this frame and class.
        bucket_ids: the buckets (key >> 20) present, ascending, ``uint16``.
        bucket_ends: stored entries up to the end of each of these buckets, ``int64``.
    """

    keys: Segment
    counts: Any  # Optional[Segment]
    num_pixels: int
    bucket_ids: np.ndarray
    bucket_ends: np.ndarray

    def span(self, bucket_lo: int, bucket_hi: int) -> Tuple[int, int]:
        """Stored entries ``[start, stop)`` whose bucket lies in ``[bucket_lo, bucket_hi)``."""
        i0, i1 = np.searchsorted(self.bucket_ids, (bucket_lo, bucket_hi), side='left')
        start = int(self.bucket_ends[i0 - 1]) if i0 else 0
        stop = int(self.bucket_ends[i1 - 1]) if i1 else 0
        return start, stop


def spill_sorted_runs(folder: SpillFolder, values: np.ndarray, kind: str) -> SortedRuns:
    """Sorts one frame's float32 scores of one class and spills them.

    Args:
        folder: where to write.
        values: finite float32 scores (any shape; not modified).
        kind: file stem (e.g. ``'msp_pos'``).

    Returns:
        The in-memory :class:`SortedRuns` record.
    """
    values = np.sort(np.asarray(values, dtype=np.float32).reshape(-1))
    keys = float_keys(values)
    del values
    n = int(keys.size)
    starts = np.flatnonzero(np.concatenate(([True], keys[1:] != keys[:-1]))) if n else \
        np.zeros(0, np.int64)
    counts_seg = None
    if n and 2 * starts.size <= n:  # run-length encoding halves the bytes (or better)
        run_counts = np.diff(starts, append=n)
        keys = keys[starts]
        counts_seg = folder.append(kind + '_counts', run_counts.astype(
            np.uint32 if n < 2**32 else np.int64))
    buckets = (keys >> BUCKET_SHIFT).astype(np.uint16)
    firsts = np.flatnonzero(np.concatenate(([True], buckets[1:] != buckets[:-1]))) if n else \
        np.zeros(0, np.int64)
    bucket_ends = np.append(firsts[1:], keys.size).astype(np.int64) if n else \
        np.zeros(0, np.int64)
    keys_seg = folder.append(kind + '_keys', keys)
    return SortedRuns(keys_seg, counts_seg, n, buckets[firsts].copy(), bucket_ends)


def chunk_plan(entries_per_bucket: np.ndarray, max_entries: int) -> List[Tuple[int, int]]:
    """Consecutive bucket ranges ``[lo, hi)`` of at most ``max_entries`` entries each.

    A bucket with more entries than that forms a range of its own (merged in groups).

    Args:
        entries_per_bucket: stored entries per bucket over all frames (``[NUM_BUCKETS]``).
        max_entries: budget per range.

    Returns:
        Non-empty ranges in ascending order; empty buckets are skipped.
    """
    plan: List[Tuple[int, int]] = []
    total = 0
    for bucket in np.flatnonzero(entries_per_bucket).tolist():
        size = int(entries_per_bucket[bucket])
        if plan and total + size <= max_entries:
            plan[-1] = (plan[-1][0], bucket + 1)  # the bucket joins the current range
            total += size
        else:
            plan.append((bucket, bucket + 1))
            total = size
    return plan


def _reduce(keys: Sequence[np.ndarray], counts: Sequence[np.ndarray]
            ) -> Tuple[np.ndarray, np.ndarray]:
    """Distinct keys (ascending) and summed int64 counts of the given (key, count) parts."""
    if not keys:
        return np.zeros(0, np.uint32), np.zeros(0, np.int64)
    all_keys = np.concatenate(keys)
    all_counts = np.concatenate(counts)
    # Stable sort on concatenated sorted parts: timsort finds the runs and merges them.
    order = np.argsort(all_keys, kind='stable')
    all_keys = all_keys[order]
    all_counts = all_counts[order]
    del order
    starts = np.flatnonzero(np.concatenate(([True], all_keys[1:] != all_keys[:-1])))
    return all_keys[starts], np.add.reduceat(all_counts, starts)


def merge_sorted_sets(parts: Iterable[Tuple[np.ndarray, np.ndarray]]
                      ) -> Tuple[np.ndarray, np.ndarray]:
    """Merges (distinct keys, counts) sets into one (e.g. the ranks' merged chunks)."""
    parts = [p for p in parts if len(p[0])]
    if len(parts) == 1:
        return parts[0]
    return _reduce([p[0] for p in parts], [p[1] for p in parts])


def merge_runs(runs: Sequence[SortedRuns], bucket_lo: int, bucket_hi: int,
               max_entries: int = MAX_ENTRIES) -> Tuple[np.ndarray, np.ndarray]:
    """Distinct keys and pixel counts of all frames' entries in buckets ``[lo, hi)``.

    Frames are read in groups of about ``max_entries`` entries, each group merged into the
    running result, so memory stays bounded even when one bucket holds more.

    Args:
        runs: the frames (one class).
        bucket_lo: first bucket.
        bucket_hi: end bucket.
        max_entries: entries gathered before a merge step.

    Returns:
        ``(keys uint32 ascending distinct, counts int64)``.
    """
    merged = (np.zeros(0, np.uint32), np.zeros(0, np.int64))
    keys: List[np.ndarray] = []
    counts: List[np.ndarray] = []
    gathered = 0
    for run in runs:
        start, stop = run.span(bucket_lo, bucket_hi)
        if stop <= start:
            continue
        keys.append(read_segment(run.keys, start, stop))
        counts.append(read_segment(run.counts, start, stop).astype(np.int64)
                      if run.counts is not None else np.ones(stop - start, np.int64))
        gathered += stop - start
        if gathered >= max_entries:
            merged = _reduce([merged[0]] + keys, [merged[1]] + counts)
            keys, counts, gathered = [], [], 0
    if keys:
        merged = _reduce([merged[0]] + keys, [merged[1]] + counts)
    return merged


class Exchange:
    """Collective operations between evaluation ranks; this base class is the single process.

    A distributed subclass (see :mod:`.metric`) implements both with ``mmengine.dist``.
    """

    def all_sum(self, array: np.ndarray) -> np.ndarray:
        """Element-wise sum of ``array`` over ranks."""
        return array

    def all_gather(self, obj: Any) -> List[Any]:
        """``obj`` of every rank, in rank order."""
        return [obj]

    def gather_in_order(self, items: Sequence[Any], order: Sequence[int]) -> List[Any]:
        """Per-frame items of every rank sorted by dataset position (the single-process order).

        Args:
            items: this rank's per-frame items (small: statistics, never pixels).
            order: dataset position of each item.

        Returns:
            All ranks' items, ordered by position.
        """
        pairs = [pair for part in self.all_gather(list(zip(order, items))) for pair in part]
        pairs.sort(key=lambda pair: pair[0])
        return [item for _, item in pairs]


def exact_pixel_metrics(positives: Sequence[SortedRuns], negatives: Sequence[SortedRuns],
                        tpr_level: float = 0.95, max_entries: int = MAX_ENTRIES,
                        exchange: Exchange = Exchange()) -> PixelMetrics:
    """Exact pooled AP, FPR at ``tpr_level``, AUROC and best-F1 threshold of spilled frames.

    Equal bit for bit to :func:`.pixel_metrics.pooled_pixel_metrics` on the concatenated pixels.

    Args:
        positives: anomaly-pixel runs of this rank's frames.
        negatives: inlier-pixel runs of this rank's frames.
        tpr_level: TPR level of the FPR metric.
        max_entries: memory budget of a merge step, in stored entries.
        exchange: collectives between ranks (default: one process).

    Returns:
        :class:`.pixel_metrics.PixelMetrics` of the frames of all ranks.
    """
    totals = exchange.all_sum(np.array([sum(r.num_pixels for r in positives),
                                        sum(r.num_pixels for r in negatives)], np.int64))
    num_pos, num_neg = int(totals[0]), int(totals[1])
    curve = CurveAccumulator(num_pos, num_neg, tpr_level)
    entries = np.zeros(NUM_BUCKETS, dtype=np.int64)
    for run in list(positives) + list(negatives):
        entries[run.bucket_ids] += np.diff(run.bucket_ends, prepend=0)
    entries = exchange.all_sum(entries)
    if num_pos == 0:
        return curve.result()
    pos_below = neg_below = 0
    for lo, hi in chunk_plan(entries, max_entries):
        pos = merge_runs(positives, lo, hi, max_entries)
        neg = merge_runs(negatives, lo, hi, max_entries)
        parts = exchange.all_gather((pos, neg))
        if len(parts) > 1:
            pos = merge_sorted_sets(p[0] for p in parts)
            neg = merge_sorted_sets(p[1] for p in parts)
        pos_keys, pos_counts = pos
        neg_keys, neg_counts = neg
        if len(pos_keys):
            neg_cum = np.concatenate(([0], np.cumsum(neg_counts)))
            below = pos_below + np.cumsum(pos_counts) - pos_counts  # positives < value
            curve.add(key_floats(pos_keys), pos_counts, num_pos - below,
                      neg_below + neg_cum[np.searchsorted(neg_keys, pos_keys, side='left')],
                      neg_below + neg_cum[np.searchsorted(neg_keys, pos_keys, side='right')])
        pos_below += int(pos_counts.sum())
        neg_below += int(neg_counts.sum())
    return curve.result()
