"""``RemapAnomalyLabels``: raw benchmark label ids -> 0 (inlier) / 1 (anomaly) / 255 (void).

mmseg's ``LoadAnnotations`` can only shift labels (``reduce_zero_label``) or rename classes
(``label_map`` from class names); the anomaly benchmarks need value remaps with ranges
(LostAndFound: 0 -> 255, 1 -> 0, 2..200 -> 1) and a check that no other value occurs, hence this
transform. It runs after ``LoadAnnotations`` and uses the lookup table the anomaly datasets put in
each sample (``anomaly_label_lut``) unless a mapping is given explicitly.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import numpy as np
from mmcv.transforms import BaseTransform
from mmseg.registry import TRANSFORMS

#: LUT value marking a raw label that must not occur.
UNEXPECTED = -1


def build_label_lut(mapping: Optional[Dict[int, int]] = None,
                    ranges: Sequence[Tuple[int, int, int]] = ()) -> np.ndarray:
    """A 256-entry lookup table raw id -> new id (``UNEXPECTED`` for ids not listed).

    Args:
        mapping: raw id -> new id.
        ranges: ``(low, high, new_id)`` triples mapping every raw id in ``[low, high]``
            (inclusive) to ``new_id``; applied before ``mapping``.

    Returns:
        int16 array of shape (256,).
    """
    lut = np.full(256, UNEXPECTED, dtype=np.int16)
    for low, high, new in ranges:
        if not 0 <= low <= high <= 255:
            raise ValueError(f'label range ({low}, {high}) must satisfy 0 <= low <= high <= 255')
        lut[low:high + 1] = new
    for raw, new in (mapping or {}).items():
        if not 0 <= int(raw) <= 255 or not 0 <= int(new) <= 255:
            raise ValueError(f'label mapping {raw} -> {new} must use ids in [0, 255]')
        lut[int(raw)] = int(new)
    return lut


@TRANSFORMS.register_module()
class RemapAnomalyLabels(BaseTransform):
    """Remaps ``gt_seg_map`` to 0 / 1 / 255 and rejects unexpected raw values.

    Required keys: ``gt_seg_map`` (and ``anomaly_label_lut`` unless ``mapping``/``ranges`` is
    given). Modified keys: ``gt_seg_map`` (uint8).

    Args:
        mapping: raw id -> new id; overrides the dataset's table when given (with ``ranges``).
        ranges: ``(low, high, new_id)`` inclusive ranges, e.g. ``[(2, 200, 1)]``.
    """

    def __init__(self, mapping: Optional[Dict[int, int]] = None,
                 ranges: Sequence[Tuple[int, int, int]] = ()) -> None:
        super().__init__()
        self.lut = build_label_lut(mapping, ranges) if (mapping or ranges) else None

    def transform(self, results: dict) -> dict:
        """Applies the lookup table to ``results['gt_seg_map']``.

        Args:
            results: the pipeline's sample dict.

        Returns:
            The same dict with the remapped label map.
        """
        path = results.get('seg_map_path', '<unknown label file>')
        lut = self.lut if self.lut is not None else results.get('anomaly_label_lut')
        if lut is None:
            raise KeyError(f'RemapAnomalyLabels has no mapping for {path}: give mapping/ranges or '
                           'use an anomaly dataset (it provides anomaly_label_lut)')
        seg = results.get('gt_seg_map')
        if seg is None:
            raise KeyError(f'RemapAnomalyLabels needs gt_seg_map (put it after LoadAnnotations); '
                           f'label file {path}')
        if seg.ndim != 2:
            raise ValueError(f'label file {path} must be a single-channel image, got shape '
                             f'{seg.shape}')
        lut = np.asarray(lut, dtype=np.int16)
        if seg.size and (seg.min() < 0 or seg.max() > 255):
            raise ValueError(f'label file {path} has values outside [0, 255] '
                             f'({int(seg.min())}..{int(seg.max())}); expected an 8-bit label map')
        out = lut[seg]
        if (out == UNEXPECTED).any():
            bad = np.unique(seg[out == UNEXPECTED])[:10].tolist()
            allowed = np.flatnonzero(lut != UNEXPECTED).tolist()
            raise ValueError(f'label file {path} has unexpected values {bad}; this dataset allows '
                             f'{_compact(allowed)}')
        results['gt_seg_map'] = out.astype(np.uint8)
        return results

    def __repr__(self) -> str:
        return f'{self.__class__.__name__}(explicit_mapping={self.lut is not None})'


def _compact(values: Sequence[int]) -> str:
    """'0, 1, 2..200, 255' style listing of sorted ids."""
    parts, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            parts.append(str(start) if start == v else f'{start}..{v}')
            start = None
    return ', '.join(parts)
