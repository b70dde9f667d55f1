"""``AnomalyVisHook``: image | anomaly heat map | ground truth, side by side, one PNG per image.

mmseg's ``SegVisualizationHook`` paints class predictions only and has no notion of a continuous
anomaly map, hence this small test-time hook. The heat map is min-max normalised per image over
the non-void pixels (so it shows the ranking the pooled metrics evaluate) and coloured with
OpenCV's INFERNO map; ground truth: inlier black, anomaly white, void grey.
"""
from __future__ import annotations

import os
import os.path as osp
from typing import Any, Optional, Sequence

import cv2
import mmcv
import numpy as np
from mmengine.hooks import Hook
from mmseg.registry import HOOKS


def anomaly_panel(image: np.ndarray, score: np.ndarray, label: Optional[np.ndarray],
                  ignore_index: int = 255) -> np.ndarray:
    """The three-panel picture.

    Args:
        image: ``[H, W, 3]`` BGR uint8 image (resized to the score's size if needed).
        score: ``[H, W]`` anomaly scores.
        label: ``[H, W]`` 0 / 1 / ``ignore_index`` labels, or None (panel omitted).
        ignore_index: void label.

    Returns:
        ``[H, 2W or 3W, 3]`` BGR uint8 picture.
    """
    h, w = score.shape
    if image.shape[:2] != (h, w):
        image = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)
    valid = label != ignore_index if label is not None else np.ones_like(score, bool)
    values = score[valid] if valid.any() else score.reshape(-1)
    low, high = float(values.min()), float(values.max())
    norm = (score - low) / (high - low) if high > low else np.zeros_like(score)
    heat = cv2.applyColorMap(np.clip(norm * 255, 0, 255).astype(np.uint8), cv2.COLORMAP_INFERNO)
    panels = [image, heat]
    if label is not None:
        gt = np.full((h, w, 3), 128, np.uint8)
        gt[label == 0] = 0
        gt[label == 1] = 255
        panels.append(gt)
    return np.concatenate(panels, axis=1)


@HOOKS.register_module()
class AnomalyVisHook(Hook):
    """Saves :func:`anomaly_panel` pictures during testing.

    Args:
        out_dir: output folder (created).
        score_name: which ``anomaly_scores`` field to paint (default: the first in sorted order;
            ``PixelData`` keeps its fields in a set, whose order changes between processes).
        max_images: stop after this many pictures (None: all).
        ignore_index: void label.
    """

    priority = 'LOW'

    def __init__(self, out_dir: str, score_name: Optional[str] = None,
                 max_images: Optional[int] = None, ignore_index: int = 255) -> None:
        self.out_dir = out_dir
        self.score_name = score_name
        self.max_images = max_images
        self.ignore_index = ignore_index
        self._count = 0

    def before_test(self, runner) -> None:
        """Restarts the count for each test run."""
        self._count = 0

    def after_test_iter(self, runner, batch_idx: int, data_batch: Any = None,
                        outputs: Optional[Sequence[Any]] = None) -> None:
        """Writes the pictures of one batch.

        Args:
            runner: the runner.
            batch_idx: batch index.
            data_batch: the loader's batch.
            outputs: the model's SegDataSamples.
        """
        for sample in outputs or []:
            if self.max_images is not None and self._count >= self.max_images:
                return
            scores = getattr(sample, 'anomaly_scores', None)
            if scores is None:
                raise KeyError('AnomalyVisHook needs data_sample.anomaly_scores (set the model '
                               'test_cfg anomaly_scores)')
            name = self.score_name or sorted(scores.keys())[0]
            score = scores.get(name)
            if score is None:
                raise KeyError(f'AnomalyVisHook: no anomaly score {name!r}; present: '
                               f'{list(scores.keys())}')
            score = score.detach().float().cpu().numpy()[0]
            label = None
            if 'gt_sem_seg' in sample:
                label = sample.gt_sem_seg.data.cpu().numpy()[0]
            path = sample.metainfo.get('img_path')
            image = mmcv.imread(path) if path else np.zeros(score.shape + (3,), np.uint8)
            os.makedirs(self.out_dir, exist_ok=True)
            stem = osp.splitext(osp.basename(path))[0] if path else f'{self._count:06d}'
            mmcv.imwrite(anomaly_panel(image, score, label, self.ignore_index),
                         osp.join(self.out_dir, f'{stem}_{name}.png'))
            self._count += 1
