"""Anomaly segmentation benchmark datasets (mmseg ``DATASETS``).

Every dataset yields raw labels plus a lookup table ``anomaly_label_lut`` that the
``RemapAnomalyLabels`` transform applies after ``LoadAnnotations``, giving the common convention
0 = in-distribution, 1 = anomaly, 255 = void, the convention of the SegmentMeIfYouCan
benchmark (https://segmentmeifyoucan.com) and of RbA / Mask2Anomaly's evaluation code.

Layouts:

* common research layout (``AnomalyFolderDataset`` and the named subclasses)::

      <data_root>/images/<name>.{png,jpg,jpeg,webp}
      <data_root>/labels_masks/<name>.png

  folders ``RoadAnomaly21``, ``RoadObsticle21`` [sic], ``RoadAnomaly`` (anomaly stored as 2),
  ``fs_static``, ``FS_LostFound_full``;
* SegmentMeIfYouCan as downloaded (``SMIYCDataset``)::

      dataset_AnomalyTrack/images/validation0000.jpg          (+ unlabelled test images)
      dataset_AnomalyTrack/labels_masks/validation0000_labels_semantic.png
      dataset_ObstacleTrack/images/validation_1.webp ...

* LostAndFound (``LostAndFoundDataset``), Cityscapes-like::

      leftImg8bit/test/<city>/<name>_leftImg8bit.png
      gtCoarse/test/<city>/<name>_gtCoarse_labelIds.png   0 unlabeled, 1 free space, 2..200 objects

mmseg's ``BaseSegDataset`` scans one image suffix and silently pairs an image with a label file
that may not exist; these datasets accept several extensions and stop with the file name when a
folder or a label is missing.
"""
from __future__ import annotations

import os
import os.path as osp
from typing import Dict, List, Optional, Sequence, Tuple

from mmseg.datasets import BaseSegDataset
from mmseg.registry import DATASETS

from .label_remap import build_label_lut

#: Image extensions accepted by the anomaly datasets.
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.webp')


@DATASETS.register_module()
class AnomalyFolderDataset(BaseSegDataset):
    """Images and 0 / 1 / 255 label masks in ``images/`` + ``labels_masks/`` folders.

    Args:
        data_root: dataset folder (holding the two sub-folders).
        data_prefix: ``dict(img_path=..., seg_map_path=...)`` relative to ``data_root``.
        img_suffixes: accepted image file endings (case-insensitive).
        seg_map_suffix: label file name = image stem + this suffix.
        label_mapping: raw id -> 0 / 1 / 255, overriding the class default ``LABEL_MAPPING``.
        label_ranges: ``(low, high, new_id)`` inclusive raw-id ranges (class default
            ``LABEL_RANGES``).
        name_prefix: keep only images whose file name starts with this (e.g. 'validation').
        recursive: also scan sub-folders of the image folder.
        **kwargs: the rest of mmseg's ``BaseSegDataset`` arguments (pipeline, test_mode, ...).
    """

    METAINFO = dict(classes=('inlier', 'anomaly'), palette=[[0, 0, 0], [255, 255, 255]])
    LABEL_MAPPING: Dict[int, int] = {0: 0, 1: 1, 255: 255}
    LABEL_RANGES: Tuple[Tuple[int, int, int], ...] = ()
    DEFAULT_PREFIX = dict(img_path='images', seg_map_path='labels_masks')
    DEFAULT_SEG_SUFFIX = '.png'
    DEFAULT_IMG_SUFFIXES: Tuple[str, ...] = IMAGE_EXTENSIONS

    def __init__(self,
                 data_root: str,
                 data_prefix: Optional[dict] = None,
                 img_suffixes: Optional[Sequence[str]] = None,
                 seg_map_suffix: Optional[str] = None,
                 label_mapping: Optional[Dict[int, int]] = None,
                 label_ranges: Optional[Sequence[Tuple[int, int, int]]] = None,
                 name_prefix: Optional[str] = None,
                 recursive: bool = False,
                 **kwargs) -> None:
        self.img_suffixes = tuple(s.lower() for s in (img_suffixes or self.DEFAULT_IMG_SUFFIXES))
        self.name_prefix = name_prefix
        self.recursive = recursive
        self.anomaly_label_lut = build_label_lut(
            self.LABEL_MAPPING if label_mapping is None else label_mapping,
            self.LABEL_RANGES if label_ranges is None else label_ranges)
        kwargs.setdefault('test_mode', True)
        super().__init__(data_root=data_root,
                         data_prefix=dict(data_prefix or self.DEFAULT_PREFIX),
                         seg_map_suffix=seg_map_suffix or self.DEFAULT_SEG_SUFFIX,
                         img_suffix=self.img_suffixes[0],
                         **kwargs)

    def _image_stem(self, rel_path: str) -> Optional[str]:
        """Stem of an image path with one of the accepted suffixes, else None."""
        lower = rel_path.lower()
        for suffix in sorted(self.img_suffixes, key=len, reverse=True):
            if lower.endswith(suffix):
                return rel_path[:-len(suffix)]
        return None

    def _scan_images(self, img_dir: str) -> List[str]:
        if self.recursive:
            found = []
            for root, _, files in os.walk(img_dir):
                found += [osp.relpath(osp.join(root, f), img_dir) for f in files]
        else:
            found = [f for f in os.listdir(img_dir) if osp.isfile(osp.join(img_dir, f))]
        return sorted(found)

    def load_data_list(self) -> List[dict]:
        """Pairs every image with its label file.

        Returns:
            list of data infos (img_path, seg_map_path, anomaly_label_lut, ...), sorted by path.

        Raises:
            FileNotFoundError: a folder is missing, no image is found, or an image has no label.
        """
        img_dir = self.data_prefix.get('img_path')
        ann_dir = self.data_prefix.get('seg_map_path')
        for kind, folder in (('image', img_dir), ('label', ann_dir)):
            if not folder or not osp.isdir(folder):
                raise FileNotFoundError(f'{type(self).__name__}: {kind} folder {folder!r} does not '
                                        'exist')
        data_list = []
        for rel in self._scan_images(img_dir):
            stem = self._image_stem(rel)
            if stem is None:
                continue
            if self.name_prefix and not osp.basename(stem).startswith(self.name_prefix):
                continue
            seg_path = osp.join(ann_dir, stem + self.seg_map_suffix)
            if not osp.isfile(seg_path):
                image = osp.join(img_dir, rel)
                raise FileNotFoundError(f'{type(self).__name__}: image {image} has no label file '
                                        f'(expected {seg_path})')
            data_list.append(dict(img_path=osp.join(img_dir, rel), seg_map_path=seg_path,
                                  label_map=None, reduce_zero_label=False, seg_fields=[],
                                  anomaly_label_lut=self.anomaly_label_lut))
        if not data_list:
            what = f' starting with {self.name_prefix!r}' if self.name_prefix else ''
            raise FileNotFoundError(f'{type(self).__name__}: no image{what} with suffix '
                                    f'{"/".join(self.img_suffixes)} in {img_dir}')
        return data_list


@DATASETS.register_module()
class RoadAnomaly21Dataset(AnomalyFolderDataset):
    """SegmentMeIfYouCan RoadAnomaly21 validation in the common layout (labels 0 / 1 / 255)."""


@DATASETS.register_module()
class RoadObstacle21Dataset(AnomalyFolderDataset):
    """SegmentMeIfYouCan RoadObstacle21 validation in the common layout (folder
    ``RoadObsticle21``; labels 0 road / 1 obstacle / 255 off-road)."""


@DATASETS.register_module()
class FishyscapesStaticDataset(AnomalyFolderDataset):
    """Fishyscapes Static validation in the common layout (``fs_static``; 0 / 1 / 255)."""


@DATASETS.register_module()
class FishyscapesLostFoundDataset(AnomalyFolderDataset):
    """Fishyscapes Lost & Found validation in the common layout (``FS_LostFound_full``)."""


@DATASETS.register_module()
class RoadAnomalyDataset(AnomalyFolderDataset):
    """Road Anomaly (Lis et al., 60 images): anomalies are stored as 2 and become 1.

    A raw 1 is also read as anomaly (as the community's evaluation code does).
    """

    LABEL_MAPPING = {0: 0, 1: 1, 2: 1, 255: 255}


@DATASETS.register_module()
class SMIYCDataset(AnomalyFolderDataset):
    """A SegmentMeIfYouCan track folder as downloaded (``dataset_AnomalyTrack`` or
    ``dataset_ObstacleTrack``).

    Only the labelled split is read: by default images named ``validation*`` (the test images
    ship without labels).

    Args:
        data_root: the track folder.
        name_prefix: image name prefix of the labelled split.
        **kwargs: see :class:`AnomalyFolderDataset`.
    """

    DEFAULT_SEG_SUFFIX = '_labels_semantic.png'

    def __init__(self, data_root: str, name_prefix: Optional[str] = 'validation',
                 **kwargs) -> None:
        super().__init__(data_root=data_root, name_prefix=name_prefix, **kwargs)


@DATASETS.register_module()
class LostAndFoundDataset(AnomalyFolderDataset):
    """LostAndFound in its Cityscapes-like layout (default: the test split, 1203 frames).

    Raw ``gtCoarse_labelIds``: 0 unlabeled -> 255 (void), 1 free space (road) -> 0,
    2..200 object classes -> 1; anything else is an error.

    Args:
        data_root: the LostAndFound folder.
        split: sub-folder of ``leftImg8bit`` / ``gtCoarse`` ('test' or 'train').
        **kwargs: see :class:`AnomalyFolderDataset`.
    """

    LABEL_MAPPING = {0: 255, 1: 0}
    LABEL_RANGES = ((2, 200, 1),)
    DEFAULT_IMG_SUFFIXES = ('_leftImg8bit.png',)
    DEFAULT_SEG_SUFFIX = '_gtCoarse_labelIds.png'

    def __init__(self, data_root: str, split: str = 'test', **kwargs) -> None:
        kwargs.setdefault('data_prefix', dict(img_path=f'leftImg8bit/{split}',
                                              seg_map_path=f'gtCoarse/{split}'))
        kwargs.setdefault('recursive', True)
        super().__init__(data_root=data_root, **kwargs)
