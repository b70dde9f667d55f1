"""Reading and checking one data sample for ``AnomalyMetric``: score maps and the 0/1/void label.

A sample comes from mmengine's evaluator as a dict or as a ``SegDataSample``; every check names
the frame (``img_path``) so a bad label or a missing score is found in the dataset at once.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .scores import check_evaluated_score_names

__all__ = ['frame_name', 'sample_arrays']


def _get(container: Any, key: str) -> Any:
    """Field of a data sample given as a dict (mmengine's evaluator) or a data element."""
    if isinstance(container, dict):
        return container.get(key)
    return getattr(container, key, None)


def _to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach()
        if value.is_floating_point() and value.dtype != torch.float64:
            value = value.float()  # numpy has no bfloat16; half/bf16 scores widen exactly
        return value.cpu().numpy()
    return np.asarray(value)


def _drop_channel(array: np.ndarray) -> np.ndarray:
    """[1, H, W] -> [H, W] (PixelData keeps a channel axis); other shapes unchanged."""
    return array[0] if array.ndim == 3 and array.shape[0] == 1 else array


def _pixel_data_fields(element: Any) -> Dict[str, Any]:
    """name -> array of a PixelData given as a dict or a data element."""
    if element is None:
        return {}
    # dict.items() and BaseDataElement.items() both give (name, value) pairs.
    return {k: v for k, v in element.items() if isinstance(v, (torch.Tensor, np.ndarray))}


def frame_name(sample: Any) -> str:
    """The sample's ``img_path`` (empty when unknown)."""
    return str(_get(_get(sample, 'metainfo') or {}, 'img_path') or _get(sample, 'img_path') or '')


def sample_arrays(sample: Any, score_names: Optional[Sequence[str]], ignore_index: int
                  ) -> Tuple[Dict[str, np.ndarray], np.ndarray, List[str]]:
    """Checked float32 score maps and label of one sample.

    Args:
        sample: a dict or ``SegDataSample`` with ``anomaly_scores`` and ``gt_sem_seg``.
        score_names: scores to read; None = every field of ``anomaly_scores``.
        ignore_index: void label.

    Returns:
        ``(scores, label, names)``: ``{name: [H, W] float32}``, the ``[H, W]`` label (values
        0, 1, ``ignore_index``) and the score names read.

    Raises:
        KeyError: no ``anomaly_scores`` / ``gt_sem_seg``, or a requested score is missing.
        ValueError: label values other than 0, 1, ``ignore_index``; a score map of another shape
            than the label; NaN or infinite scores.
    """
    path = frame_name(sample)
    where = f' (image {path})' if path else ''
    fields = _pixel_data_fields(_get(sample, 'anomaly_scores'))
    if not fields:
        raise KeyError('AnomalyMetric needs data_sample.anomaly_scores; set the model\'s '
                       f'test_cfg anomaly_scores=[...]{where}')
    names = list(score_names) if score_names is not None else check_evaluated_score_names(list(fields))
    gt_field = _get(sample, 'gt_sem_seg')
    gt_data = _get(gt_field, 'data') if gt_field is not None else None
    if gt_data is None:
        raise KeyError(f'AnomalyMetric needs data_sample.gt_sem_seg{where}')
    gt = _drop_channel(_to_numpy(gt_data))
    bad = ~((gt == 0) | (gt == 1) | (gt == ignore_index))
    if bad.any():
        found = np.unique(gt[bad])[:10].tolist()
        raise ValueError(f'ground truth{where} has labels {found}; expected 0 (inlier), '
                         f'1 (anomaly), {ignore_index} (void)')
    scores = {}
    for name in names:
        if name not in fields:
            raise KeyError(f'anomaly score {name!r} missing from anomaly_scores{where}; '
                           f'present: {sorted(fields)}')
        score = _drop_channel(_to_numpy(fields[name]))
        if score.shape != gt.shape:
            raise ValueError(f'anomaly score {name!r} has shape {score.shape} but the label has '
                             f'{gt.shape}{where}: scores must be computed at label resolution')
        # Scores are compared at the float32 precision they are computed in.
        score = score.astype(np.float32, copy=False)
        if not np.isfinite(score).all():
            raise ValueError(f'anomaly score {name!r} has NaN/inf values{where}')
        scores[name] = score
    return scores, gt, names
