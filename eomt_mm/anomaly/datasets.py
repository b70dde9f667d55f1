"""Anomaly segmentation benchmark datasets (mmseg ``DATASETS``), labelled or images-only.

Every labelled dataset yields raw labels plus a lookup table ``anomaly_label_lut`` that the
``RemapAnomalyLabels`` transform applies after ``LoadAnnotations``, giving the common convention
0 = in-distribution, 1 = anomaly, 255 = void, the convention of the SegmentMeIfYouCan
benchmark (https://segmentmeifyoucan.com) and of RbA / Mask2Anomaly's evaluation code.

Layouts:

* common research layout (``AnomalyFolderDataset`` and the named subclasses)::

      <data_root>/images/<name>.{png,jpg,jpeg,webp}
      <data_root>/labels_masks/<name>.png

  folders ``RoadAnomaly21``, ``RoadObsticle21`` [sic], ``RoadAnomaly`` (anomaly stored as 2),
  ``fs_static``, ``FS_LostFound_full``;
* SegmentMeIfYouCan as downloaded (``SMIYCDataset``, ``split='validation'`` or ``'test'``)::

      dataset_AnomalyTrack/images/validation0000.jpg          (+ the test images, no labels)
      dataset_AnomalyTrack/labels_masks/validation0000_labels_semantic.png
      dataset_ObstacleTrack/images/validation_1.webp ...

* LostAndFound (``LostAndFoundDataset``, optionally a subset the benchmark defines),
  Cityscapes-like::

      leftImg8bit/test/<city>/<name>_leftImg8bit.png
      gtCoarse/test/<city>/<name>_gtCoarse_labelIds.png   0 unlabeled, 1 free space, 2..200 objects

Images-only splits (``labelled=False``; ``SMIYCDataset(split='test')`` implies it) are the test
server's frames, labels hidden: no label folder is read, samples carry no ``gt_sem_seg``, and the
pipeline must not load annotations (the configs use ``test_unlabelled_pipeline`` of
``configs/_base_/datasets/common_anomaly_benchmark.py``; ``LoadAnnotations`` is refused at build
time). They have no metrics; ``tools/eval_anomaly.py --smiyc-submission DIR`` writes their files.
Every frame carries ``frame_name``, the benchmark's frame id: the image file name without its
suffix (``airplane0000``; LostAndFound's without ``_leftImg8bit.png``).

mmseg's ``BaseSegDataset`` scans one image suffix and silently pairs an image with a label file
that may not exist; these datasets accept several extensions and stop with the file name when a
folder or a label of a labelled split is missing.
"""
from __future__ import annotations

import os
import os.path as osp
from typing import Dict, List, Optional, Sequence, Tuple

from mmcv.transforms import LoadAnnotations
from mmseg.datasets import BaseSegDataset
from mmseg.registry import DATASETS

from .label_remap import RemapAnomalyLabels, build_label_lut

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
        name_prefix: keep only frames whose name starts with this (e.g. 'validation').
        exclude_prefixes: drop frames whose name starts with one of these.
        recursive: also scan sub-folders of the image folder.
        labelled: ``True`` (default): every frame must have its label file. ``False``: an
            images-only split (labels hidden, e.g. a test server's frames): the label folder is
            not read, and the pipeline must not contain ``LoadAnnotations`` /
            ``RemapAnomalyLabels`` (use ``test_unlabelled_pipeline`` of the anomaly configs).
        expected_frames: the number of frames the split must have (a benchmark's split size),
            so that a partial download stops here instead of giving an incomplete evaluation or
            submission; ``None`` accepts any number.
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
                 exclude_prefixes: Optional[Sequence[str]] = None,
                 recursive: bool = False,
                 labelled: bool = True,
                 expected_frames: Optional[int] = None,
                 **kwargs) -> None:
        self.img_suffixes = tuple(s.lower() for s in (img_suffixes or self.DEFAULT_IMG_SUFFIXES))
        self.name_prefix = name_prefix
        if isinstance(exclude_prefixes, str):
            raise TypeError(f'exclude_prefixes must be a list, got the string {exclude_prefixes!r}')
        self.exclude_prefixes = tuple(exclude_prefixes or ())
        self.recursive = recursive
        self.labelled = bool(labelled)
        if expected_frames is not None and not (isinstance(expected_frames, int)
                                                and expected_frames > 0):
            raise ValueError(f'expected_frames must be a positive int or None: {expected_frames!r}')
        self.expected_frames = expected_frames
        self.anomaly_label_lut = build_label_lut(
            self.LABEL_MAPPING if label_mapping is None else label_mapping,
            self.LABEL_RANGES if label_ranges is None else label_ranges)
        kwargs.setdefault('test_mode', True)
        super().__init__(data_root=data_root,
                         data_prefix=dict(data_prefix or self.DEFAULT_PREFIX),
                         seg_map_suffix=seg_map_suffix or self.DEFAULT_SEG_SUFFIX,
                         img_suffix=self.img_suffixes[0],
                         **kwargs)
        if not self.labelled:
            self._check_unlabelled_pipeline()

    def _check_unlabelled_pipeline(self) -> None:
        """An images-only split has no label file: refuse a pipeline that would load one."""
        needs_labels = [type(t).__name__ for t in self.pipeline.transforms
                        if isinstance(t, (LoadAnnotations, RemapAnomalyLabels))]
        if needs_labels:
            raise ValueError(f'{type(self).__name__}: this split is images-only (labelled=False: '
                             f'no label files), but its pipeline has {needs_labels}; use a '
                             'pipeline without them (test_unlabelled_pipeline in '
                             'configs/_base_/datasets/common_anomaly_benchmark.py)')

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

    def _keep_frame(self, name: str) -> bool:
        """Whether the frame of this name belongs to the selected split."""
        if self.name_prefix and not name.startswith(self.name_prefix):
            return False
        return not name.startswith(self.exclude_prefixes) if self.exclude_prefixes else True

    def _selection(self) -> str:
        """The frame selection in words, for error messages."""
        parts = [f' starting with {self.name_prefix!r}'] if self.name_prefix else []
        if self.exclude_prefixes:
            parts.append(f' not starting with {list(self.exclude_prefixes)}')
        return ' and'.join(parts)

    def _select_frames(self, data_list: List[dict]) -> List[dict]:
        """Further selection of the scanned frames (subclasses: a benchmark's subset)."""
        return data_list

    def load_data_list(self) -> List[dict]:
        """Lists the split's frames, each with its label file unless images-only.

        Returns:
            list of data infos (img_path, seg_map_path, frame_name, anomaly_label_lut, ...),
            sorted by path.

        Raises:
            FileNotFoundError: a folder is missing, no image is found, or an image of a labelled
                split has no label.
            ValueError: two frames share a name, or the split has not ``expected_frames`` frames.
        """
        img_dir = self.data_prefix.get('img_path')
        ann_dir = self.data_prefix.get('seg_map_path')
        folders = [('image', img_dir)] + ([('label', ann_dir)] if self.labelled else [])
        for kind, folder in folders:
            if not folder or not osp.isdir(folder):
                hint = (' (an images-only split, whose labels are hidden, is read with '
                        'labelled=False)' if kind == 'label' else '')
                raise FileNotFoundError(f'{type(self).__name__}: {kind} folder {folder!r} does '
                                        f'not exist{hint}')
        data_list = []
        for rel in self._scan_images(img_dir):
            stem = self._image_stem(rel)
            if stem is None or not self._keep_frame(osp.basename(stem)):
                continue
            info = dict(img_path=osp.join(img_dir, rel), seg_map_path=None, label_map=None,
                        reduce_zero_label=False, seg_fields=[], frame_name=osp.basename(stem))
            if self.labelled:
                seg_path = osp.join(ann_dir, stem + self.seg_map_suffix)
                if not osp.isfile(seg_path):
                    raise FileNotFoundError(f'{type(self).__name__}: image {info["img_path"]} '
                                            f'has no label file (expected {seg_path})')
                info.update(seg_map_path=seg_path, anomaly_label_lut=self.anomaly_label_lut)
            data_list.append(info)
        if not data_list:
            raise FileNotFoundError(f'{type(self).__name__}: no image{self._selection()} with '
                                    f'suffix {"/".join(self.img_suffixes)} in {img_dir}')
        data_list = self._select_frames(data_list)
        seen: Dict[str, str] = {}
        for info in data_list:  # the benchmark names frames (and score files) by file stem
            other = seen.setdefault(info['frame_name'], info['img_path'])
            if other != info['img_path']:
                raise ValueError(f'{type(self).__name__}: {other} and {info["img_path"]} have '
                                 f'the same frame name {info["frame_name"]!r}')
        if self.expected_frames is not None and len(data_list) != self.expected_frames:
            raise ValueError(f'{type(self).__name__}: found {len(data_list)} frames'
                             f'{self._selection()} in {img_dir}, but this split has '
                             f'{self.expected_frames} (expected_frames); is the download '
                             'complete? (expected_frames=None accepts any number)')
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

    The benchmark's track splits (``AnomalyTrack-all``, ``ObstacleTrack-all``) hold every image
    of the folder; the validation frames' labels are published, the others' are hidden:

    * ``split='validation'`` (default): the frames named ``validation*``, with their
      ``labels_masks/<name>_labels_semantic.png``;
    * ``split='test'``: every other frame, images only (``labelled=False`` implied; pipeline
      without ``LoadAnnotations``): the test server's frames, for ``tools/eval_anomaly.py
      --smiyc-submission``. Together the two splits are the benchmark's ``*-all`` frame set.

    Args:
        data_root: the track folder.
        split: ``'validation'`` or ``'test'``.
        scenes: keep only frames of these scenes, the scene being the frame name up to its first
            ``'_'`` (the benchmark's ObstacleTrack rule, e.g. ``'curvy-street'``); ``None``
            keeps every scene.
        name_prefix: name prefix of the validation frames: the validation split keeps them,
            the test split drops them.
        **kwargs: see :class:`AnomalyFolderDataset` (``labelled`` follows from ``split``).
    """

    DEFAULT_SEG_SUFFIX = '_labels_semantic.png'
    SPLITS = ('validation', 'test')

    def __init__(self, data_root: str, split: str = 'validation',
                 scenes: Optional[Sequence[str]] = None,
                 name_prefix: Optional[str] = 'validation', **kwargs) -> None:
        if split not in self.SPLITS:
            raise ValueError(f'SMIYCDataset split must be one of {list(self.SPLITS)}, got '
                             f'{split!r}')
        if 'labelled' in kwargs:
            raise ValueError("SMIYCDataset: the split decides whether labels are read "
                             "('validation': labelled, 'test': images only); do not pass "
                             'labelled')
        if isinstance(scenes, str):
            raise TypeError(f'scenes must be a list of scene names, got the string {scenes!r}')
        self.split = split
        self.scenes = None if scenes is None else frozenset(scenes)
        if split == 'test':
            if not name_prefix:
                raise ValueError("SMIYCDataset split 'test' drops the frames named name_prefix*: "
                                 "give the validation frames' prefix")
            excluded = tuple(kwargs.pop('exclude_prefixes', None) or ()) + (name_prefix, )
            kwargs.update(labelled=False, exclude_prefixes=excluded)
            name_prefix = None
        super().__init__(data_root=data_root, name_prefix=name_prefix, **kwargs)

    def _keep_frame(self, name: str) -> bool:
        if self.scenes is not None and name.split('_')[0] not in self.scenes:
            return False
        return super()._keep_frame(name)

    def _selection(self) -> str:
        scenes = f' of scenes {sorted(self.scenes)}' if self.scenes is not None else ''
        return super()._selection() + scenes


# LostAndFound subsets of the SegmentMeIfYouCan benchmark, as its repository defines them
# (github.com/SegmentMeIfYouCan/road-anomaly-benchmark, road_anomaly_benchmark/datasets/
# tracks.py, DatasetLostAndFound.configs, commit 1c7804e): the frames of the full split are
# sorted by frame id, the frames at `exclude_indices` (its comment: frames whose labels are all
# 0) are removed, then those whose id starts with one of `exclude_prefixes` (known objects:
# children, bicycles); `full` and `frames` are its expected lengths before and after.
_LAF_TEST_INVALID = (17, 37, 55, 72, 91, 110, 129, 153, 174, 197, 218, 353, 490, 618, 686, 792,
                     793)
LOSTANDFOUND_SUBSETS: Dict[str, dict] = {
    'LostAndFound-trainValid': dict(split='train', full=1036, frames=1030,
                                    exclude_indices=(44, 67, 88, 109, 131, 614),
                                    exclude_prefixes=()),
    'LostAndFound-testValid': dict(split='test', full=1203, frames=1186,
                                   exclude_indices=_LAF_TEST_INVALID, exclude_prefixes=()),
    'LostAndFound-testNoKnown': dict(
        split='test', full=1203, frames=1043, exclude_indices=_LAF_TEST_INVALID,
        exclude_prefixes=('15_Rechbergstr_Deckenpfronn', '01_Hanns_Klemm_Str_45_000006',
                          '01_Hanns_Klemm_Str_45_000007', '10_Schlossberg_9_000004')),
}


@DATASETS.register_module()
class LostAndFoundDataset(AnomalyFolderDataset):
    """LostAndFound in its Cityscapes-like layout (default: the test split, 1203 frames).

    Raw ``gtCoarse_labelIds``: 0 unlabeled -> 255 (void), 1 free space (road) -> 0,
    2..200 object classes -> 1; anything else is an error.

    Args:
        data_root: the LostAndFound folder.
        split: sub-folder of ``leftImg8bit`` / ``gtCoarse`` ('test' or 'train'; default
            'test', or the subset's).
        subset: a subset the benchmark defines (:data:`LOSTANDFOUND_SUBSETS`):
            ``'LostAndFound-testNoKnown'`` (its obstacle-track evaluation split),
            ``'LostAndFound-testValid'``, ``'LostAndFound-trainValid'``; it removes frames by
            their position in the split, so the folder must hold the whole split. The test
            server takes the whole ``LostAndFound-test`` and selects the subset itself.
        **kwargs: see :class:`AnomalyFolderDataset`.
    """

    LABEL_MAPPING = {0: 255, 1: 0}
    LABEL_RANGES = ((2, 200, 1),)
    DEFAULT_IMG_SUFFIXES = ('_leftImg8bit.png',)
    DEFAULT_SEG_SUFFIX = '_gtCoarse_labelIds.png'

    def __init__(self, data_root: str, split: Optional[str] = None,
                 subset: Optional[str] = None, **kwargs) -> None:
        if subset is not None and subset not in LOSTANDFOUND_SUBSETS:
            raise ValueError(f'unknown LostAndFound subset {subset!r}; the benchmark defines '
                             f'{sorted(LOSTANDFOUND_SUBSETS)} (None: the whole split)')
        self.subset = subset
        subset_split = LOSTANDFOUND_SUBSETS[subset]['split'] if subset else None
        if split is not None and subset_split is not None and split != subset_split:
            raise ValueError(f'subset {subset} is part of the {subset_split!r} split, not '
                             f'{split!r}')
        split = split or subset_split or 'test'
        self.split = split
        kwargs.setdefault('data_prefix', dict(img_path=f'leftImg8bit/{split}',
                                              seg_map_path=f'gtCoarse/{split}'))
        kwargs.setdefault('recursive', True)
        super().__init__(data_root=data_root, **kwargs)

    def _select_frames(self, data_list: List[dict]) -> List[dict]:
        """The benchmark's subset: positions in the id-sorted full split, then prefixes."""
        if self.subset is None:
            return data_list
        spec = LOSTANDFOUND_SUBSETS[self.subset]
        where = f'{type(self).__name__} subset {self.subset}'
        if len(data_list) != spec['full']:
            raise ValueError(f'{where} removes frames by their position in the whole '
                             f'{spec["split"]} split ({spec["full"]} frames), but '
                             f'{self.data_prefix["img_path"]} holds {len(data_list)}: the '
                             'subset needs the complete LostAndFound split (subset=None reads '
                             'any folder)')
        ordered = sorted(data_list, key=lambda info: info['frame_name'])
        removed = set(spec['exclude_indices'])
        prefixes = tuple(spec['exclude_prefixes'])
        kept = [info for i, info in enumerate(ordered)
                if i not in removed and not (prefixes and info['frame_name'].startswith(prefixes))]
        if len(kept) != spec['frames']:
            raise ValueError(f'{where} leaves {len(kept)} frames, not the benchmark\'s '
                             f'{spec["frames"]}: are these LostAndFound\'s frame names?')
        return kept
