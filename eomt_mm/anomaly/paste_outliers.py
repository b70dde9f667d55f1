"""``PasteOutliers``: outlier exposure by pasting COCO-style objects into training images.

Source = a folder of images plus a COCO "instances" json (polygons, uncompressed or compressed
RLE). Following the outlier-exposure recipe of RbA (Nayal et al., ICCV 2023) and Mask2Anomaly
(Rai et al., ICCV 2023), every source image that contains an
instance of an excluded class (by default the COCO classes that overlap Cityscapes: person,
bicycle, car, motorcycle, bus, truck, traffic light, stop sign) is dropped, and the union of the
remaining instance masks of an image is the outlier object. With probability ``prob`` a random
source object is resized (its longer side = ``scale_range`` x the target's shorter side), pasted
at a uniformly random position fully inside the image, and its pixels get ``paste_label`` in
``gt_seg_map`` (255 = ignore for the closed-set loss; a dedicated id such as 254 lets an outlier
loss find them).

mmseg has no copy-paste transform and pycocotools is not a dependency of the stack, so the
mask decoding (``cv2.fillPoly`` for polygons, the COCO RLE string codec) is done here.
Place it after ``LoadAnnotations`` and before the geometric augmentations.
"""
from __future__ import annotations

import json
import os.path as osp
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import mmcv
import numpy as np
from mmcv.transforms import BaseTransform
from mmseg.registry import TRANSFORMS

#: COCO classes that are (parts of) Cityscapes classes: images containing them are not outliers.
COCO_CITYSCAPES_OVERLAP = ('person', 'bicycle', 'car', 'motorcycle', 'bus', 'truck',
                           'traffic light', 'stop sign')


def rle_string_to_counts(text: str) -> List[int]:
    """Decodes COCO's compressed RLE string into run lengths.

    Each count is stored as little-endian groups of 5 bits in characters offset by 48; bit 5
    marks a continuation, bit 4 of the last group the sign; from the third count on, the value is
    a difference to the count two positions earlier.

    Args:
        text: the ``counts`` string of a compressed RLE.

    Returns:
        The run lengths (alternating background / foreground, starting with background).
    """
    counts: List[int] = []
    pos = 0
    while pos < len(text):
        value, shift, more = 0, 0, True
        while more:
            group = ord(text[pos]) - 48
            value |= (group & 0x1F) << shift
            more = bool(group & 0x20)
            pos += 1
            shift += 5
            if not more and group & 0x10:
                value |= -1 << shift
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return counts


def decode_segmentation(segmentation, height: int, width: int) -> np.ndarray:
    """A COCO ``segmentation`` field as a bool mask.

    Args:
        segmentation: list of polygons, or an RLE dict with ``counts`` (list or string).
        height: image height.
        width: image width.

    Returns:
        ``[height, width]`` bool mask.
    """
    if isinstance(segmentation, list):
        mask = np.zeros((height, width), np.uint8)
        polys = [np.asarray(p, np.float64).reshape(-1, 2) for p in segmentation if len(p) >= 6]
        if polys:
            cv2.fillPoly(mask, [np.round(p).astype(np.int32) for p in polys], 1)
        return mask.astype(bool)
    if isinstance(segmentation, dict) and 'counts' in segmentation:
        counts = segmentation['counts']
        if isinstance(counts, str):
            counts = rle_string_to_counts(counts)
        size = segmentation.get('size', [height, width])
        h, w = int(size[0]), int(size[1])
        flat = np.zeros(h * w, bool)
        pos, fg = 0, False
        for run in counts:
            if fg:
                flat[pos:pos + run] = True
            pos += run
            fg = not fg
        # COCO RLE runs go down the columns (Fortran order).
        return flat.reshape((w, h)).T
    raise ValueError(f'unsupported COCO segmentation {type(segmentation).__name__}: expected '
                     'polygons or an RLE dict')


@TRANSFORMS.register_module()
class PasteOutliers(BaseTransform):
    """Pastes one COCO-style object (union of an image's instances) with probability ``prob``.

    Required keys: ``img``, ``gt_seg_map``. Modified: ``img``, ``gt_seg_map``. Added:
    ``outlier_paste`` (dict with source file, ``bbox`` (x0, y0, x1, y1), ``area``) or None.

    Args:
        ann_file: COCO instances json.
        img_dir: folder of the json's ``file_name`` entries.
        prob: probability of pasting into a sample.
        scale_range: ``(low, high)``: the pasted object's longer side is uniform in this range
            times the target image's shorter side.
        paste_label: label written at pasted pixels (255 = ignore; e.g. 254 for an outlier loss).
        exclude_classes: COCO category names whose images are never used.
        min_area: ignore source objects smaller than this many pixels.
        seed: seed of the transform's own generator (None: numpy's global RNG, which mmengine
            seeds per worker). With a seed, each data-loader worker offsets it by its id.
    """

    def __init__(self,
                 ann_file: str,
                 img_dir: str,
                 prob: float = 0.5,
                 scale_range: Tuple[float, float] = (0.05, 0.3),
                 paste_label: int = 255,
                 exclude_classes: Sequence[str] = COCO_CITYSCAPES_OVERLAP,
                 min_area: int = 64,
                 seed: Optional[int] = None) -> None:
        super().__init__()
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f'prob must be in [0, 1], got {prob}')
        low, high = scale_range
        if not 0.0 < low <= high <= 1.0:
            raise ValueError(f'scale_range must satisfy 0 < low <= high <= 1, got {scale_range}')
        if not 0 <= paste_label <= 255:
            raise ValueError(f'paste_label must be in [0, 255], got {paste_label}')
        self.prob = prob
        self.scale_range = (float(low), float(high))
        self.paste_label = int(paste_label)
        self.img_dir = img_dir
        self.seed = seed
        self._rng: Optional[np.random.Generator] = None
        self.sources = self._load_sources(ann_file, set(exclude_classes), min_area)

    def _load_sources(self, ann_file: str, exclude: set, min_area: int) -> List[Dict]:
        if not osp.isfile(ann_file):
            raise FileNotFoundError(f'PasteOutliers: annotation file {ann_file} does not exist')
        if not osp.isdir(self.img_dir):
            raise FileNotFoundError(f'PasteOutliers: image folder {self.img_dir} does not exist')
        with open(ann_file) as f:
            coco = json.load(f)
        for key in ('images', 'annotations', 'categories'):
            if key not in coco:
                raise ValueError(f'PasteOutliers: {ann_file} has no {key!r} (not a COCO '
                                 'instances file)')
        names = {c['id']: c['name'] for c in coco['categories']}
        unknown = exclude - set(names.values())
        excluded_ids = {i for i, n in names.items() if n in exclude}
        per_image: Dict[int, List[dict]] = {}
        for ann in coco['annotations']:
            per_image.setdefault(ann['image_id'], []).append(ann)
        sources = []
        for img in coco['images']:
            anns = per_image.get(img['id'], [])
            if not anns or any(a['category_id'] in excluded_ids for a in anns):
                continue
            if sum(a.get('area', min_area) for a in anns) < min_area:
                continue
            sources.append(dict(file_name=img['file_name'], height=img['height'],
                                width=img['width'],
                                segmentations=[a['segmentation'] for a in anns]))
        if not sources:
            hint = f' (exclude_classes not in the file: {sorted(unknown)})' if unknown else ''
            raise ValueError(f'PasteOutliers: no usable source image in {ann_file} after '
                             f'excluding {sorted(exclude)}{hint}')
        return sources

    @property
    def rng(self) -> np.random.Generator:
        """The transform's generator (created lazily so each worker offsets its random seed)."""
        if self._rng is None:
            if self.seed is None:
                self._rng = np.random.default_rng(np.random.randint(2**31))
            else:
                import torch.utils.data
                info = torch.utils.data.get_worker_info()
                self._rng = np.random.default_rng([self.seed, info.id if info else 0])
        return self._rng

    def _object(self, source: Dict) -> Tuple[np.ndarray, np.ndarray]:
        """Cropped object image and mask of a source."""
        path = osp.join(self.img_dir, source['file_name'])
        img = mmcv.imread(path)
        if img is None:
            raise FileNotFoundError(f'PasteOutliers: cannot read source image {path}')
        h, w = img.shape[:2]
        mask = np.zeros((h, w), bool)
        for seg in source['segmentations']:
            mask |= decode_segmentation(seg, h, w)
        ys, xs = np.nonzero(mask)
        if ys.size == 0:
            raise ValueError(f'PasteOutliers: the annotations of {path} give an empty mask')
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        return img[y0:y1, x0:x1], mask[y0:y1, x0:x1]

    def transform(self, results: dict) -> dict:
        """Pastes (or not) one outlier object.

        Args:
            results: the pipeline's sample dict.

        Returns:
            The same dict.
        """
        results['outlier_paste'] = None
        rng = self.rng
        if rng.random() >= self.prob:
            return results
        img, seg = results['img'], results['gt_seg_map']
        th, tw = img.shape[:2]
        if seg.shape[:2] != (th, tw):
            raise ValueError(f'PasteOutliers: image {img.shape[:2]} and label {seg.shape} differ; '
                             'place the transform before any resize of one of them')
        source = self.sources[int(rng.integers(len(self.sources)))]
        obj, mask = self._object(source)
        longer = rng.uniform(*self.scale_range) * min(th, tw)
        factor = longer / max(obj.shape[:2])
        oh = int(np.clip(round(obj.shape[0] * factor), 1, th))
        ow = int(np.clip(round(obj.shape[1] * factor), 1, tw))
        obj = cv2.resize(obj, (ow, oh), interpolation=cv2.INTER_LINEAR)
        mask = cv2.resize(mask.astype(np.uint8), (ow, oh), interpolation=cv2.INTER_NEAREST) > 0
        y0 = int(rng.integers(0, th - oh + 1))
        x0 = int(rng.integers(0, tw - ow + 1))
        if obj.ndim == 2 and img.ndim == 3:
            obj = cv2.cvtColor(obj, cv2.COLOR_GRAY2BGR)
        region = img[y0:y0 + oh, x0:x0 + ow]
        region[mask] = obj[mask].astype(img.dtype)
        seg[y0:y0 + oh, x0:x0 + ow][mask] = self.paste_label
        results['outlier_paste'] = dict(source=source['file_name'], bbox=(x0, y0, x0 + ow, y0 + oh),
                                        area=int(mask.sum()))
        return results

    def __repr__(self) -> str:
        return (f'{self.__class__.__name__}(sources={len(self.sources)}, prob={self.prob}, '
                f'scale_range={self.scale_range}, paste_label={self.paste_label}, '
                f'seed={self.seed})')
