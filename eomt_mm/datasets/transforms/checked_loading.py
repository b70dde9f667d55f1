"""Image and label loading that names a bad file and says what to do.

Why these exist: mmcv's ``LoadImageFromFile`` reports an undecodable file as a
bare ``AssertionError: failed to load image: PATH`` and mmseg's
``LoadAnnotations`` as ``AttributeError: 'NoneType' object has no attribute
'squeeze'`` (no file name at all): OpenCV returns ``None`` for truncated or
garbage bytes. These subclasses keep every argument and all behaviour of the
originals and only turn a decoding failure into :class:`CorruptImageError`,
naming the file and the fix. The dataset configs in ``configs/_base_/datasets``
use them in place of the originals.

``LoadAnnotationsChecked`` also checks what mmseg never checks: that a label map
has its image's size (``RandomResize`` would otherwise stretch a label of the
right aspect silently, and any other size fails much later inside the loss or
``IoUMetric`` without a file name), and, given ``num_classes``, that its values
are class ids or the ignore index (``IoUMetric`` would otherwise score a 200 in
a 19-class set silently). Both errors name the files.
"""
from __future__ import annotations

import os.path as osp
from typing import Optional

import numpy as np
from mmcv.transforms import LoadImageFromFile
from mmseg.datasets.transforms import LoadAnnotations
from mmseg.registry import TRANSFORMS

__all__ = ['CorruptImageError', 'LabelMismatchError', 'corrupt_image_message',
           'LoadImageFromFileChecked', 'LoadAnnotationsChecked']


class CorruptImageError(OSError):
    """An image or label file exists but cannot be decoded.

    Takes a single message (so a DataLoader worker can re-raise it in the
    main process); :func:`corrupt_image_message` builds it.
    """


class LabelMismatchError(ValueError):
    """A label map does not fit its image (size) or the classes (values)."""


def corrupt_image_message(filename: str, what: str, detail: str = '') -> str:
    """The message for a file that exists but cannot be decoded.

    Args:
        filename: The file that failed to decode.
        what: ``'image'`` or ``'label map'``.
        detail: The decoder's own error, if it raised one.

    Returns:
        A message naming the file and how to replace it.
    """
    msg = (
        f'The {what} file {filename!r} is corrupt or truncated: it could '
        'not be decoded. Replace it with a good copy (re-download or '
        're-extract the data set archive, see the README section "Data '
        'preparation"); for the built-in demo data run '
        '`python tools/make_demo_data.py --out <data root>`, which '
        're-renders files that do not match its manifest.')
    if detail:
        msg += f' Decoder said: {detail}'
    return msg


def _raise_for(filename: str, what: str, err: Optional[Exception]) -> None:
    """Re-raise ``err`` as :class:`CorruptImageError` unless the file is
    missing (that error already names the file and is not corruption)."""
    if isinstance(err, FileNotFoundError) or not osp.exists(filename):
        if err is not None:
            raise err
        raise FileNotFoundError(f'The {what} file {filename!r} does not '
                                'exist.')
    detail = '' if err is None or isinstance(err, AssertionError) else str(err)
    raise CorruptImageError(corrupt_image_message(filename, what,
                                                  detail)) from err


@TRANSFORMS.register_module()
class LoadImageFromFileChecked(LoadImageFromFile):
    """mmcv's ``LoadImageFromFile`` with a clear error for corrupt files.

    Takes exactly the arguments of :class:`mmcv.transforms.LoadImageFromFile`
    (``to_float32``, ``color_type``, ``imdecode_backend``,
    ``file_client_args``, ``ignore_empty``, ``backend_args``).
    With ``ignore_empty=True`` a corrupt file still yields ``None``, as
    upstream.
    """

    def transform(self, results: dict) -> Optional[dict]:
        """Load ``results['img_path']``.

        Args:
            results: Result dict from the dataset.

        Returns:
            The dict with ``img``, ``img_shape`` and ``ori_shape``.

        Raises:
            CorruptImageError: If the file exists but cannot be decoded.
        """
        try:
            return super().transform(results)
        except Exception as err:  # noqa: BLE001  re-raised with context
            if self.ignore_empty:
                return None
            _raise_for(results['img_path'], 'image', err)


@TRANSFORMS.register_module()
class LoadAnnotationsChecked(LoadAnnotations):
    """mmseg's ``LoadAnnotations`` with clear errors for corrupt or mismatched label maps.

    Args:
        num_classes: Number of classes; when given, every label value must be a class id in
            ``[0, num_classes)`` or ``ignore_index`` (checked after mmseg's ``label_map`` and
            ``reduce_zero_label``). None skips the value check (e.g. raw anomaly-benchmark
            labels, which ``RemapAnomalyLabels`` checks).
        ignore_index: The void label.
        **kwargs: The arguments of :class:`mmseg.datasets.transforms.LoadAnnotations`
            (``reduce_zero_label``, ``backend_args``, ``imdecode_backend``).
    """

    def __init__(self, num_classes: Optional[int] = None, ignore_index: int = 255,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        if num_classes is not None and (isinstance(num_classes, bool)
                                        or not isinstance(num_classes, int) or num_classes < 1):
            raise ValueError(f'LoadAnnotationsChecked num_classes must be a positive int or '
                             f'None, got {num_classes!r}')
        self.num_classes = num_classes
        self.ignore_index = int(ignore_index)

    def _load_seg_map(self, results: dict) -> None:
        """Load ``results['seg_map_path']`` into ``results['gt_seg_map']`` and check it.

        Args:
            results: Result dict from the dataset (after the image was loaded, its size is
                compared with the label's).

        Raises:
            CorruptImageError: If the file exists but cannot be decoded.
            LabelMismatchError: If the label's size differs from the image's, or it holds
                values that are neither class ids nor ``ignore_index``.
        """
        try:
            super()._load_seg_map(results)
        except Exception as err:  # noqa: BLE001  re-raised with context
            _raise_for(results['seg_map_path'], 'label map', err)
        label = results['gt_seg_map']
        path = results['seg_map_path']
        image_hw = results.get('ori_shape')
        if image_hw is not None and tuple(label.shape[:2]) != tuple(image_hw[:2]):
            raise LabelMismatchError(
                f'label map {path!r} is {label.shape[0]}x{label.shape[1]} (HxW) but its image '
                f"{results.get('img_path')!r} is {image_hw[0]}x{image_hw[1]}: a label must "
                'have its image\'s size (re-export the label, or fix the dataset\'s '
                'img_path / seg_map_path pairing)')
        if self.num_classes is not None:
            values = np.unique(label)
            bad = values[(values >= self.num_classes) & (values != self.ignore_index)]
            if bad.size:
                raise LabelMismatchError(
                    f'label map {path!r} holds values {bad[:10].tolist()} that are neither class '
                    f'ids 0..{self.num_classes - 1} nor the ignore index {self.ignore_index}: '
                    'labels must be train ids (Cityscapes: the *_labelTrainIds.png files of '
                    '`python tools/prepare_cityscapes.py`), or set the dataset\'s label_map / '
                    'reduce_zero_label, or num_classes of LoadAnnotationsChecked in the config')
