"""Input checks shared by the SMIYC pixel metrics, component metrics and submission writer."""
from __future__ import annotations

from typing import Tuple

import numpy as np

#: Label values of a SegmentMeIfYouCan frame: inlier, anomaly, void (outside the ROI).
LABEL_VALUES = (0, 1, 255)


def check_score(score: np.ndarray, what: str = 'score') -> np.ndarray:
    """A 2-D floating score map (``[1, H, W]`` is squeezed, as the benchmark's reader does).

    Args:
        score: the anomaly score map.
        what: name used in the error messages.

    Returns:
        The ``[H, W]`` array (not copied).
    """
    score = np.asarray(score)
    if score.ndim == 3 and score.shape[0] == 1:
        score = score[0]
    if score.ndim != 2:
        raise ValueError(f'{what} must be an [H, W] map (or [1, H, W]), got shape {score.shape}')
    if not np.issubdtype(score.dtype, np.floating):
        raise TypeError(f'{what} must be floating point (float16/32/64), got {score.dtype}')
    return score


def check_label(label: np.ndarray) -> np.ndarray:
    """A 2-D integer label map with values in {0, 1, 255}.

    Args:
        label: 0 = inlier, 1 = anomaly, 255 = void.

    Returns:
        The ``[H, W]`` array (not copied).
    """
    label = np.asarray(label)
    if label.ndim == 3 and label.shape[0] == 1:
        label = label[0]
    if label.ndim != 2:
        raise ValueError(f'label must be an [H, W] map (or [1, H, W]), got shape {label.shape}')
    if not np.issubdtype(label.dtype, np.integer):
        raise TypeError(f'label must be an integer array with values 0/1/255, got {label.dtype}')
    if label.size:
        low, high = int(label.min()), int(label.max())
        if low < 0 or high > 255:
            raise ValueError(f'label values must be 0 (inlier), 1 (anomaly) or 255 (void); '
                             f'found values from {low} to {high}')
        present = np.flatnonzero(np.bincount(label.ravel().astype(np.intp), minlength=256))
        unexpected = sorted(set(present.tolist()) - set(LABEL_VALUES))
        if unexpected:
            raise ValueError(f'label values must be 0 (inlier), 1 (anomaly) or 255 (void); '
                             f'found {unexpected[:10]}: remap the dataset labels first '
                             '(e.g. LostAndFound labelIds with lostandfound_obstacle_label)')
    return label


def check_frame(score: np.ndarray, label: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Check one frame: score and label maps of one shape, labels 0/1/255, finite ROI scores.

    Args:
        score: ``[H, W]`` floating anomaly scores.
        label: ``[H, W]`` labels, 0 = inlier, 1 = anomaly, 255 = void.

    Returns:
        ``(score, label)`` as ``[H, W]`` arrays.
    """
    score = check_score(score)
    label = check_label(label)
    if score.shape != label.shape:
        raise ValueError(f'score map {score.shape} and label {label.shape} differ in shape; '
                         'evaluate scores at the label resolution')
    roi = label != 255
    if not np.isfinite(score[roi]).all():
        raise ValueError('scores inside the region of interest (label != 255) must be finite; '
                         f'found {int((~np.isfinite(score[roi])).sum())} NaN/inf values '
                         f'(a float16 map overflows beyond +-{float(np.finfo(np.float16).max)})')
    return score, label
