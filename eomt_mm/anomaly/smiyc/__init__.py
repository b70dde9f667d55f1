"""The SegmentMeIfYouCan (SMIYC) benchmark's own evaluation protocol, and its submission files.

The leaderboard (SegmentMeIfYouCan/road-anomaly-benchmark) bins every frame's scores and merges
the bins; its figures differ from the exact pooled ones of :mod:`eomt_mm.anomaly.pixel_metrics`.

Per frame (small, mergeable results; see each module for the exact rules)::

    bins = frame_pixel_bins(score, label)                        # FramePixelBins, <= 769 bins
    pixel = merge_pixel_bins(all_bins)                           # AP, FPR95, AUROC, best F1
    comps = frame_components(score, label, pixel.best_f1_threshold, track='obstacle')
    result = merge_components(all_comps, pixel.best_f1_threshold)

The component pass needs the dataset's threshold, hence a second pass over the score maps.
Scores as the leaderboard sees them: ``to_submission_scores(score)`` (float16).
"""
from .checks import LABEL_VALUES, check_frame
from .components import (F1_TAUS, TRACKS, FrameComponents, SmiycComponentResult,
                         frame_components, merge_components, track_sizes)
from .lostandfound import (lostandfound_anomaly_label, lostandfound_obstacle_label,
                           read_roi_mask)
from .pixel import (SMIYC_NUM_BINS, FramePixelBins, SmiycPixelResult, frame_pixel_bins,
                    merge_pixel_bins)
from .submission import (SMIYC_DATASETS, SubmissionWriter, read_submission_frame,
                         to_submission_scores)

__all__ = [
    'LABEL_VALUES', 'check_frame', 'F1_TAUS', 'TRACKS', 'FrameComponents',
    'SmiycComponentResult', 'frame_components', 'merge_components', 'track_sizes',
    'lostandfound_anomaly_label', 'lostandfound_obstacle_label', 'read_roi_mask',
    'SMIYC_NUM_BINS', 'FramePixelBins', 'SmiycPixelResult', 'frame_pixel_bins',
    'merge_pixel_bins', 'SMIYC_DATASETS', 'SubmissionWriter', 'read_submission_frame',
    'to_submission_scores'
]
