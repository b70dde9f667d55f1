"""Per-frame anomaly score files in the layout the SegmentMeIfYouCan benchmark evaluates.

The benchmark (SegmentMeIfYouCan/road-anomaly-benchmark, ``road_anomaly_benchmark/evaluation.py``
``Evaluation.save_output`` and its ``ChannelLoaderHDF5``) stores one HDF5 file per frame::

    <root>/anomaly_p/<method_name>/<dataset>/<frame_id>.hdf5

holding one dataset named ``value``: the ``[H, W]`` score map (higher = more anomalous) at the
image's full resolution, cast to float16, gzip level 9. Its evaluator reads the files back with
h5py (``file['value'][:]``, squeezed) from ``DIR_OUTPUTS=<root>``, so the same folder also runs
the benchmark's own metrics locally. ``<dataset>`` is the name the benchmark stores a split under:
``AnomalyTrack-all``, ``ObstacleTrack-all``, ``LostAndFound-test`` or ``LostAndFound-train`` (the
other splits are subsets of these four); ``<frame_id>`` is the image file's stem (for
LostAndFound without the ``_leftImg8bit`` suffix). The test server's frames have hidden labels:
the anomaly datasets read them images-only (``SMIYCDataset(split='test')``, ``labelled=False``).

Writing needs h5py: ``pip install -e .[smiyc]``.
"""
from __future__ import annotations

import os
import os.path as osp
import re
from typing import Dict, List

import numpy as np

from eomt_mm.utils.io import atomic_write

from .checks import check_score

try:  # optional dependency of the submission writer only
    import h5py
except ImportError:  # pragma: no cover - depends on the environment
    h5py = None

#: The dataset folders the benchmark's evaluation reads (its ``name_for_persistence`` values).
SMIYC_DATASETS = ('AnomalyTrack-all', 'ObstacleTrack-all', 'LostAndFound-test',
                  'LostAndFound-train')
#: Frames of a complete split, the benchmark's ``expected_length`` (road_anomaly_benchmark/
#: datasets/tracks.py; it states none for ObstacleTrack-all).
SMIYC_SPLIT_FRAMES = {'AnomalyTrack-all': 110, 'LostAndFound-test': 1203,
                      'LostAndFound-train': 1036}
#: Name of the HDF5 dataset holding the score map.
HDF5_KEY = 'value'
#: dtype and gzip level of the stored scores.
SUBMISSION_DTYPE = np.float16
GZIP_LEVEL = 9

_SAFE_NAME = re.compile(r'^[A-Za-z0-9][A-Za-z0-9._+-]*$')


def _check_name(value: str, what: str) -> str:
    if not isinstance(value, str) or not _SAFE_NAME.match(value) or value.endswith('.'):
        raise ValueError(f'{what} {value!r} must be a non-empty file name of letters, digits and '
                         "'._+-' (no path separators), as the benchmark uses it in file paths")
    return value


def to_submission_scores(score_map: np.ndarray) -> np.ndarray:
    """The score map as the benchmark stores and evaluates it: ``[H, W]`` float16.

    Args:
        score_map: ``[H, W]`` (or ``[1, H, W]``) floating anomaly scores.

    Returns:
        The float16 ``[H, W]`` array.
    """
    score = check_score(score_map, 'score_map')
    if not np.isfinite(score).all():
        raise ValueError('score_map has NaN or inf values; the benchmark cannot rank them')
    with np.errstate(over='ignore'):  # overflow is reported below, with the fix
        stored = score.astype(SUBMISSION_DTYPE)
    if not np.isfinite(stored).all():
        limit = float(np.finfo(SUBMISSION_DTYPE).max)
        raise ValueError(f'score_map has values beyond +-{limit}, which overflow the float16 '
                         'files the benchmark reads; rescale the scores (ranking is all that '
                         'counts) before writing')
    return stored


class SubmissionWriter:
    """Writes a SMIYC submission folder, one HDF5 file per frame.

    Args:
        out_dir: root of the submission; must not exist or be an empty folder, so that files of
            another run are never mixed in (or overwritten).
        method_name: the method's folder name under ``anomaly_p/``.

    Example::

        writer = SubmissionWriter('work_dirs/smiyc', 'EoMT-RbA')
        writer.write('AnomalyTrack-all', 'airplane0000', score_map)
        print(writer.upload_instructions())
    """

    def __init__(self, out_dir: str, method_name: str) -> None:
        if h5py is None:
            raise ImportError('writing SMIYC submission files needs h5py: '
                              'pip install -e .[smiyc]')
        self.method_name = _check_name(method_name, 'method_name')
        self.out_dir = osp.abspath(os.fspath(out_dir))
        if osp.exists(self.out_dir):
            if not osp.isdir(self.out_dir):
                raise FileExistsError(f'submission folder {self.out_dir} exists and is not a '
                                      'folder; choose a new path')
            if os.listdir(self.out_dir):
                raise FileExistsError(f'submission folder {self.out_dir} exists and is not '
                                      'empty; choose a new folder (nothing was written)')
        os.makedirs(self.out_dir, exist_ok=True)
        self.method_dir = osp.join(self.out_dir, 'anomaly_p', self.method_name)
        self._frames: Dict[str, List[str]] = {}

    def path_for(self, dataset: str, frame_name: str) -> str:
        """File path of one frame's scores.

        Args:
            dataset: one of :data:`SMIYC_DATASETS`.
            frame_name: the frame id (image file stem).

        Returns:
            ``<out_dir>/anomaly_p/<method_name>/<dataset>/<frame_name>.hdf5``.
        """
        if dataset not in SMIYC_DATASETS:
            raise ValueError(f'unknown SMIYC dataset {dataset!r}; the benchmark evaluates the '
                             f'folders {list(SMIYC_DATASETS)}')
        _check_name(frame_name, 'frame_name')
        return osp.join(self.method_dir, dataset, f'{frame_name}.hdf5')

    def write(self, dataset: str, frame_name: str, score_map: np.ndarray) -> str:
        """Write one frame's score map (atomically; an existing file is an error).

        Args:
            dataset: one of :data:`SMIYC_DATASETS`.
            frame_name: the frame id (image file stem).
            score_map: ``[H, W]`` floating anomaly scores at the image's full resolution.

        Returns:
            The written path.
        """
        path = self.path_for(dataset, frame_name)
        stored = to_submission_scores(score_map)
        if osp.exists(path):
            raise FileExistsError(f'{path} was already written: frame {frame_name!r} of '
                                  f'{dataset} appears twice')

        def _write(tmp: str) -> None:
            with h5py.File(tmp, 'w') as handle:
                handle.create_dataset(HDF5_KEY, data=stored, compression='gzip',
                                      compression_opts=GZIP_LEVEL)

        atomic_write(path, _write)
        self._frames.setdefault(dataset, []).append(frame_name)
        return path

    @property
    def frames(self) -> Dict[str, List[str]]:
        """Frames written so far, per dataset, in writing order."""
        return {k: list(v) for k, v in self._frames.items()}

    def upload_instructions(self) -> str:
        """What was written and what to upload, as text to print."""
        lines = [f'SMIYC submission of method {self.method_name!r} in {self.method_dir}:']
        for dataset in SMIYC_DATASETS:
            if dataset in self._frames:
                count, full = len(self._frames[dataset]), SMIYC_SPLIT_FRAMES.get(dataset)
                # A partial folder is reported, not refused: a local check of some frames is fine.
                short = (f' (incomplete: the benchmark\'s {dataset} has {full} frames; the server '
                         'needs all of them)' if full is not None and count != full else '')
                lines.append(f'  {dataset}: {count} frames{short}')
        if not self._frames:
            lines.append('  (no frame written)')
        lines.append(f'Upload the folder anomaly_p/{self.method_name}/ (e.g. as a zip of it, '
                     f'made in {osp.join(self.out_dir, "anomaly_p")}) through the '
                     'SegmentMeIfYouCan submission page; to evaluate it locally with the '
                     f'benchmark\'s code, run it with DIR_OUTPUTS={self.out_dir}.')
        return '\n'.join(lines)


def read_submission_frame(path: str) -> np.ndarray:
    """Read one frame back as the benchmark's evaluator does (``file['value'][:]``, squeezed).

    Args:
        path: a file written by :class:`SubmissionWriter`.

    Returns:
        The float16 score map.
    """
    if h5py is None:
        raise ImportError('reading SMIYC submission files needs h5py: pip install -e .[smiyc]')
    with h5py.File(path, 'r') as handle:
        if HDF5_KEY not in handle:
            raise KeyError(f'{path} has no {HDF5_KEY!r} dataset (keys: {list(handle.keys())})')
        return np.squeeze(handle[HDF5_KEY][:])
