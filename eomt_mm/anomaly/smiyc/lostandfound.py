"""LostAndFound labels and regions of interest as the SegmentMeIfYouCan benchmark builds them.

LostAndFound's ``*_gtCoarse_labelIds.png`` store 0 = unlabelled, 1 = free road, 2..200 = the
object (obstacle) ids. The benchmark (SegmentMeIfYouCan/road-anomaly-benchmark,
``road_anomaly_benchmark/datasets/tracks.py`` ``DatasetLostAndFound`` and ``tracks_extra.py``
``LostAndFoundAnomaly``) evaluates them two ways:

* obstacle track (``LostAndFound-test`` / ``-testNoKnown``): the region of interest is the labelled
  drivable space: road (id 1) -> 0, obstacles (ids 2..200) -> 1, everything else -> 255;
* anomaly-style evaluation (``LostAndFound-anomalyTest``): the region of interest is the whole
  image except the ego vehicle and the sensor's borders, given by the benchmark's fixed mask
  ``road_anomaly_benchmark/datasets/LAF_roi_2048.png`` (read it with :func:`read_roi_mask`):
  void outside that mask, 0 inside, and 1 on every obstacle pixel (even outside the mask).

The benchmark also drops frames whose labels are invalid by their index in the sorted frame list
(``exclude_frame_indices`` of ``LostAndFound-testValid``); that is a choice of frames, made by the
dataset, not a region of interest.
"""
from __future__ import annotations

import os

import cv2
import numpy as np

#: labelId of the free road in LostAndFound.
LAF_ROAD_ID = 1
#: Inclusive range of LostAndFound's obstacle labelIds.
LAF_OBSTACLE_IDS = (2, 200)


def _check_label_ids(label_ids: np.ndarray) -> np.ndarray:
    label_ids = np.asarray(label_ids)
    if label_ids.ndim != 2:
        raise ValueError(f'LostAndFound labelIds must be an [H, W] map, got shape '
                         f'{label_ids.shape}')
    if not np.issubdtype(label_ids.dtype, np.integer):
        raise TypeError(f'LostAndFound labelIds must be integers, got {label_ids.dtype}')
    return label_ids


def lostandfound_obstacle_label(label_ids: np.ndarray) -> np.ndarray:
    """SMIYC obstacle-track label of a LostAndFound frame (ROI = labelled drivable space).

    Args:
        label_ids: ``[H, W]`` integer LostAndFound labelIds (``*_gtCoarse_labelIds.png``).

    Returns:
        ``[H, W]`` uint8: 0 road, 1 obstacle, 255 outside the region of interest.
    """
    label_ids = _check_label_ids(label_ids)
    label = np.full(label_ids.shape, 255, np.uint8)
    label[label_ids == LAF_ROAD_ID] = 0
    low, high = LAF_OBSTACLE_IDS
    label[(label_ids >= low) & (label_ids <= high)] = 1
    return label


def lostandfound_anomaly_label(label_ids: np.ndarray, roi_mask: np.ndarray) -> np.ndarray:
    """Label of a LostAndFound frame with the benchmark's whole-image region of interest.

    Args:
        label_ids: ``[H, W]`` integer LostAndFound labelIds.
        roi_mask: ``[H, W]`` boolean region of interest (``LAF_roi_2048.png``, see
            :func:`read_roi_mask`).

    Returns:
        ``[H, W]`` uint8: 255 outside ``roi_mask``, 0 inside, 1 on obstacle pixels.
    """
    obstacle = lostandfound_obstacle_label(label_ids) == 1
    roi_mask = np.asarray(roi_mask)
    if roi_mask.shape != obstacle.shape:
        raise ValueError(f'ROI mask {roi_mask.shape} and labelIds {obstacle.shape} differ in '
                         'shape; LAF_roi_2048.png is 2048x1024, as LostAndFound frames')
    if roi_mask.dtype != bool:
        raise TypeError(f'roi_mask must be boolean, got {roi_mask.dtype} (use read_roi_mask)')
    label = np.full(obstacle.shape, 255, np.uint8)
    label[roi_mask] = 0
    label[obstacle] = 1
    return label


def read_roi_mask(path: str) -> np.ndarray:
    """Read a region-of-interest image (nonzero = inside), e.g. the benchmark's LAF_roi_2048.png.

    Args:
        path: a single-channel image file.

    Returns:
        ``[H, W]`` boolean mask.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f'ROI mask {path!r} does not exist; LostAndFound\'s is '
                                'road_anomaly_benchmark/datasets/LAF_roi_2048.png in the '
                                'SegmentMeIfYouCan/road-anomaly-benchmark repository')
    image = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ValueError(f'could not decode {path!r} as an image')
    if image.ndim != 2:
        raise ValueError(f'ROI mask {path!r} must have one channel, got shape {image.shape}')
    return image != 0
