"""The SegmentMeIfYouCan evaluator's protocol inside ``AnomalyMetric`` (``protocol='smiyc'``).

The benchmark's computations live in :mod:`.smiyc` (pure functions: per-frame bins, their merge,
component metrics at the curve's best-F1 threshold); this class feeds them frame by frame and
across ranks:

* per frame, the score map (cast to float16 as the test server reads a submission, see
  ``float16``) and the 0/1/255 label become :class:`.smiyc.pixel.FramePixelBins`: at most 769
  bins, whatever the frame size, so these small records are what travels between ranks;
* at the end, the bins of all frames in dataset order give the curve, its AP, FPR95, AUROC and
  best-F1 threshold; the component metrics then re-read each spilled score map once.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .exact_store import Exchange
from .smiyc.components import frame_components, merge_components, track_sizes
from .smiyc.pixel import SMIYC_NUM_BINS, TPR_TARGET, frame_pixel_bins, merge_pixel_bins
from .spill import read_segment

__all__ = ['SmiycProtocol', 'COMPONENT_KEYS']

#: Component metric keys of both protocols (fractions in [0, 1]).
COMPONENT_KEYS = ('sIoU', 'PPV', 'mean_F1', 'F1@0.25', 'F1@0.50', 'F1@0.75')


class SmiycProtocol:
    """Per-frame reduction and dataset merge of the SMIYC evaluator for ``AnomalyMetric``.

    Region of interest: the label's void (255) only, as in the benchmark's evaluator; datasets
    bring their ROI in their labels (e.g. LostAndFound's gtCoarse ``0 -> void``, applied by this
    project's ``LostAndFoundDataset``). Frames without a labelled pixel (the benchmark drops
    LostAndFound's 17 such test frames by index) contribute nothing in both cases.

    Args:
        track: 'anomaly' or 'obstacle' (the benchmark's component size filters).
        tpr_level: must be 0.95 (the benchmark reports FPR at 95 % TPR only).
        num_bins: bins per frame (768 on the leaderboard).
        float16: bin the scores as float16, as the test server reads a submission's files.
    """

    def __init__(self, track: str = 'anomaly', tpr_level: float = TPR_TARGET,
                 num_bins: int = SMIYC_NUM_BINS, float16: bool = True) -> None:
        if tpr_level != TPR_TARGET:
            raise ValueError(f"protocol='smiyc' reports FPR at {TPR_TARGET:.0%} TPR only (the "
                             f"benchmark's definition); got tpr_level={tpr_level}. Use "
                             "protocol='exact' for other levels")
        track_sizes(track)  # an unknown track fails here, before any frame
        self.track = track
        self.num_bins = int(num_bins)
        self.float16 = bool(float16)

    def _as_read(self, score: np.ndarray) -> np.ndarray:
        """The score as the benchmark reads a submission (float16 by default)."""
        if not self.float16:
            return score
        with np.errstate(over='ignore'):  # overflow becomes inf, which the checks report
            return score.astype(np.float16)

    def process_frame(self, score: np.ndarray, label: np.ndarray, ignore_index: int) -> Any:
        """One frame's bins.

        Args:
            score: ``[H, W]`` float32 anomaly scores.
            label: ``[H, W]`` labels in {0, 1, ignore_index}.
            ignore_index: the label's void value.

        Returns:
            The frame's :class:`.smiyc.pixel.FramePixelBins`.
        """
        label = np.where(label == 1, 1, np.where(label == 0, 0, 255)).astype(np.uint8)
        return frame_pixel_bins(self._as_read(score), label, num_bins=self.num_bins)

    def compute(self, frames: List[Any], maps: Optional[List[Tuple[Any, Any, tuple]]],
                order: Sequence[int], exchange: Exchange, fpr_key: str
                ) -> Tuple[Dict[str, float], int, int, float, Optional[Dict[str, float]]]:
        """Dataset metrics from all frames' bins (all ranks, dataset order).

        Args:
            frames: bins of every frame of every rank, in dataset order.
            maps: this rank's spilled (score map, label, shape) per frame for the component
                metrics, or None.
            order: dataset positions of this rank's frames (those of ``maps``).
            exchange: collectives between ranks.
            fpr_key: the metric key of the FPR (``'FPR95'``).

        Returns:
            ``(pixel metrics in percent, anomaly pixels, inlier pixels, best-F1 threshold,
            component metrics (fractions) or None)``.
        """
        num_pos = sum(f.num_positives for f in frames)
        num_neg = sum(f.num_negatives for f in frames)
        nan = float('nan')
        if num_pos == 0 or num_neg == 0:
            # The benchmark raises here; like the exact protocol, report NaN (with a warning
            # from AnomalyMetric) so that the other scores and protocols still come out.
            values = {'AuPRC': nan, fpr_key: nan, 'AUROC': nan}
            components = ({key: nan for key in COMPONENT_KEYS} if maps is not None else None)
            return values, num_pos, num_neg, nan, components
        pix = merge_pixel_bins(frames)
        values = {'AuPRC': pix.average_precision * 100, fpr_key: pix.fpr_at_95_tpr * 100,
                  'AUROC': pix.auroc * 100}
        components = None
        if maps is not None:
            local = self._components(maps, pix.best_f1_threshold)
            merged = merge_components(exchange.gather_in_order(local, order),
                                      pix.best_f1_threshold)
            components = {'sIoU': merged.siou_gt, 'PPV': merged.ppv, 'mean_F1': merged.f1_mean,
                          'F1@0.25': merged.f1['25'], 'F1@0.50': merged.f1['50'],
                          'F1@0.75': merged.f1['75']}
        return values, num_pos, num_neg, pix.best_f1_threshold, components

    def _components(self, maps: List[Tuple[Any, Any, tuple]], threshold: float) -> List[Any]:
        out = []
        for map_segment, label_segment, shape in maps:
            score = read_segment(map_segment).reshape(shape)
            label = read_segment(label_segment).reshape(shape)
            out.append(frame_components(self._as_read(score), label, threshold,
                                        track=self.track))
        return out
