"""Image and label loading that names a corrupt file and says what to do.

Why these exist: mmcv's ``LoadImageFromFile`` reports an undecodable file as a
bare ``AssertionError: failed to load image: PATH`` and mmseg's
``LoadAnnotations`` as ``AttributeError: 'NoneType' object has no attribute
'squeeze'`` (no file name at all): OpenCV returns ``None`` for truncated or
garbage bytes. These subclasses keep every argument and all behaviour of the
originals and only turn a decoding failure into :class:`CorruptImageError`,
naming the file and the fix. The dataset configs in ``configs/_base_/datasets``
use them in place of the originals.
"""
from __future__ import annotations

import os.path as osp
from typing import Optional

from mmcv.transforms import LoadImageFromFile
from mmseg.datasets.transforms import LoadAnnotations
from mmseg.registry import TRANSFORMS

__all__ = ['CorruptImageError', 'corrupt_image_message',
           'LoadImageFromFileChecked', 'LoadAnnotationsChecked']


class CorruptImageError(OSError):
    """An image or label file exists but cannot be decoded.

    Takes a single message (so a DataLoader worker can re-raise it in the
    main process); :func:`corrupt_image_message` builds it.
    """


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
    """mmseg's ``LoadAnnotations`` with a clear error for corrupt label maps.

    Takes exactly the arguments of
    :class:`mmseg.datasets.transforms.LoadAnnotations` (``reduce_zero_label``,
    ``backend_args``, ``imdecode_backend``).
    """

    def _load_seg_map(self, results: dict) -> None:
        """Load ``results['seg_map_path']`` into ``results['gt_seg_map']``.

        Args:
            results: Result dict from the dataset.

        Raises:
            CorruptImageError: If the file exists but cannot be decoded.
        """
        try:
            super()._load_seg_map(results)
        except Exception as err:  # noqa: BLE001  re-raised with context
            _raise_for(results['seg_map_path'], 'label map', err)
