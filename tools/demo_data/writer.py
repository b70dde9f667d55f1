"""The demo data set on disk: deterministic, idempotent, atomic generation with a manifest."""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

from .labels import ANOMALY_TYPES, CLASSES, IGNORE_INDEX
from .scene import render_demo_scene

try:  # POSIX advisory lock so that concurrent callers (e.g. several ranks) do not race.
    import fcntl
except ImportError:  # pragma: no cover - Windows has no fcntl; generation still works there.
    fcntl = None

__all__ = ['DEMO_VERSION', 'DemoDatasetInfo', 'generate_demo_dataset', 'demo_dataset_is_current']

#: Bump when the rendering changes: an existing data set with another version is regenerated.
DEMO_VERSION = 1

_MANIFEST = 'manifest.json'
# The writer a manifest names: only a folder whose manifest names one of ours may be replaced.
_GENERATOR = 'eomt_mm tools/demo_data'
# The second name is that of data sets written before the renderer moved out of the package
# (the same files, byte for byte): ours to replace; they are regenerated once so that their
# manifest names the current writer.
_OUR_GENERATORS = (_GENERATOR, 'eomt_mm.datasets.demo_roads')
_SPLIT_STREAM = {'train': 0, 'val': 1, 'anomaly': 2}
_TRAIN_CITIES = ('demotown', 'synthburg')
_VAL_CITY = 'valcity'
# Smallest anomaly area (pixels at 128x256) accepted in an anomaly frame; scaled with image area.
MIN_ANOMALY_FRACTION = 80 / (128 * 256)


@dataclasses.dataclass(frozen=True)
class DemoDatasetInfo:
    """What :func:`generate_demo_dataset` found or wrote.

    Args:
        root: Folder of the data set (``data_root`` in the configs).
        generated: True when files were written by this call, False when an up-to-date
            data set was already there.
        num_train: Number of training images.
        num_val: Number of validation images.
        num_anomaly: Number of images in the anomaly split.
        digest: sha256 over all files (path and content), identical for identical data.
        seconds: Wall time of the call.
    """
    root: Path
    generated: bool
    num_train: int
    num_val: int
    num_anomaly: int
    digest: str
    seconds: float



def _frame_rng(seed: int, split: str, index: int) -> np.random.Generator:
    # One independent stream per frame: frame i is the same whatever the split sizes are.
    return np.random.default_rng([seed, _SPLIT_STREAM[split], index])


def _encode_png(array: np.ndarray) -> bytes:
    ok, buf = cv2.imencode('.png', array, [cv2.IMWRITE_PNG_COMPRESSION, 6])
    if not ok:  # pragma: no cover - OpenCV always encodes uint8 arrays
        raise RuntimeError(f'OpenCV failed to encode a {array.shape} {array.dtype} PNG')
    return buf.tobytes()


def _render_anomaly_frame(rng: np.random.Generator, height: int, width: int
                          ) -> tuple[np.ndarray, np.ndarray]:
    """An anomaly frame with a visible anomaly; returns the image and its 0/1/255 mask."""
    min_pixels = max(20, int(round(MIN_ANOMALY_FRACTION * height * width)))
    for _ in range(50):
        image, label, anomaly = render_demo_scene(rng, height, width,
                                                  num_anomalies=int(rng.integers(1, 4)))
        if anomaly.sum() >= min_pixels:
            mask = np.zeros((height, width), np.uint8)
            mask[label == IGNORE_INDEX] = IGNORE_INDEX
            mask[anomaly] = 1
            return image, mask
    raise RuntimeError(  # pragma: no cover - a visible object comes within a few tries
        f'could not place an anomaly of at least {min_pixels} visible pixels')


def _iter_files(num_train: int, num_val: int, num_anomaly: int, height: int, width: int,
                seed: int) -> Iterator[tuple[str, bytes]]:
    """Yields (relative path, PNG bytes) of every file of the data set, in a fixed order."""
    half = (num_train + 1) // 2
    for split, count in (('train', num_train), ('val', num_val)):
        for i in range(count):
            city = _VAL_CITY if split == 'val' else _TRAIN_CITIES[0 if i < half else 1]
            stem = f'{city}_{i:06d}_000019'
            image, label, _ = render_demo_scene(_frame_rng(seed, split, i), height, width)
            yield (f'leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png',
                   _encode_png(image[..., ::-1]))
            yield f'gtFine/{split}/{city}/{stem}_gtFine_labelTrainIds.png', _encode_png(label)
    for i in range(num_anomaly):
        image, mask = _render_anomaly_frame(_frame_rng(seed, 'anomaly', i), height, width)
        yield f'anomaly/images/demo_anomaly_{i:04d}.png', _encode_png(image[..., ::-1])
        yield f'anomaly/labels_masks/demo_anomaly_{i:04d}.png', _encode_png(mask)


def _digest(files: dict[str, str]) -> str:
    h = hashlib.sha256()
    for rel in sorted(files):
        h.update(f'{rel}\0{files[rel]}\n'.encode())
    return h.hexdigest()


def _read_manifest(root: Path) -> dict | None:
    try:
        with open(root / _MANIFEST, encoding='utf-8') as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _params(num_train: int, num_val: int, num_anomaly: int, height: int, width: int,
            seed: int) -> dict:
    for name, value, low in (('num_train', num_train, 1), ('num_val', num_val, 1),
                             ('num_anomaly', num_anomaly, 0), ('height', height, 64),
                             ('width', width, 64), ('seed', seed, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f'{name} must be an integer >= {low}, got {value!r}')
    return dict(num_train=int(num_train), num_val=int(num_val), num_anomaly=int(num_anomaly),
                height=int(height), width=int(width), seed=int(seed))


def _is_current(root: Path, params: dict) -> dict | None:
    """The manifest of ``root`` if it describes these parameters and every file matches it."""
    manifest = _read_manifest(root)
    if (manifest is None or manifest.get('generator') != _GENERATOR
            or manifest.get('version') != DEMO_VERSION or manifest.get('params') != params):
        return None
    files = manifest.get('files')
    if not isinstance(files, dict) or not files:
        return None
    for rel, sha in files.items():
        try:
            if hashlib.sha256((root / rel).read_bytes()).hexdigest() != sha:
                return None
        except OSError:
            return None
    return manifest


def demo_dataset_is_current(out_dir: str | os.PathLike = 'data/demo', *, num_train: int = 48,
                            num_val: int = 12, num_anomaly: int = 12, height: int = 128,
                            width: int = 256, seed: int = 0) -> bool:
    """Whether ``out_dir`` holds exactly the data set these parameters generate.

    Args:
        out_dir: Folder of the data set.
        num_train: Number of training images.
        num_val: Number of validation images.
        num_anomaly: Number of anomaly images.
        height: Image height.
        width: Image width.
        seed: Base random seed.

    Returns:
        True when the manifest matches the generator version and parameters and every listed
        file exists with the recorded sha256.
    """
    params = _params(num_train, num_val, num_anomaly, height, width, seed)
    return _is_current(Path(out_dir), params) is not None


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    with open(lock_path, 'a+') as f:
        if fcntl is not None:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def generate_demo_dataset(out_dir: str | os.PathLike = 'data/demo', *, num_train: int = 48,
                          num_val: int = 12, num_anomaly: int = 12, height: int = 128,
                          width: int = 256, seed: int = 0, force: bool = False
                          ) -> DemoDatasetInfo:
    """Writes the demo road-scene data set, or does nothing when it is already there.

    Files are written to the hidden sibling ``.<name>.partial`` and renamed to ``out_dir``
    only when complete, so an interrupted run never leaves a partial data set behind; a
    leftover ``.partial`` folder is removed before writing. A stale data set written by this
    function (other version or parameters, or a damaged file) is replaced as a whole; any other
    non-empty folder is refused. Concurrent callers are serialised by a lock file
    ``.<name>.lock`` beside ``out_dir`` (POSIX).

    Args:
        out_dir: Destination folder (the configs' ``data_root``).
        num_train: Number of training images (split between two "cities").
        num_val: Number of validation images.
        num_anomaly: Number of images in the anomaly split (0 to omit it).
        height: Image height in pixels (at least 64).
        width: Image width in pixels (at least 64).
        seed: Base random seed (non-negative); frame i of a split depends only on this value,
            the split and i.
        force: Regenerate even when an up-to-date data set exists.

    Returns:
        A :class:`DemoDatasetInfo` describing the data set.

    Raises:
        ValueError: A parameter is out of range.
        FileExistsError: ``out_dir`` exists and is not a data set written by this function
            (it is never overwritten then).
    """
    start = time.perf_counter()
    params = _params(num_train, num_val, num_anomaly, height, width, seed)
    root = Path(os.path.abspath(os.fspath(out_dir)))
    if root.exists() and not root.is_dir():
        raise FileExistsError(f'demo data folder {root} exists and is not a directory; '
                              'pass another --out or remove it')
    if root.is_dir() and any(root.iterdir()):
        # Only a folder this function wrote (readable manifest naming it) may be replaced.
        manifest = _read_manifest(root)
        if manifest is None or manifest.get('generator') not in _OUR_GENERATORS:
            raise FileExistsError(
                f'{root} is not empty and holds no readable {_MANIFEST} written by '
                'tools/make_demo_data.py; refusing to overwrite it. Pass another --out or '
                'remove it.')
    root.parent.mkdir(parents=True, exist_ok=True)
    partial = root.parent / f'.{root.name}.partial'
    stale = root.parent / f'.{root.name}.old'

    def info(manifest: dict, generated: bool) -> DemoDatasetInfo:
        return DemoDatasetInfo(root=root, generated=generated, num_train=params['num_train'],
                               num_val=params['num_val'], num_anomaly=params['num_anomaly'],
                               digest=manifest['digest'],
                               seconds=time.perf_counter() - start)

    with _exclusive(root.parent / f'.{root.name}.lock'):
        if not force:
            manifest = _is_current(root, params)
            if manifest is not None:
                return info(manifest, generated=False)
        for leftover in (partial, stale):  # from an interrupted earlier run
            if leftover.exists():
                shutil.rmtree(leftover)
        try:
            partial.mkdir()
            files: dict[str, str] = {}
            for rel, data in _iter_files(**params):
                path = partial / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
                files[rel] = hashlib.sha256(data).hexdigest()
            manifest = dict(
                generator=_GENERATOR, version=DEMO_VERSION, params=params,
                description=('Synthetic road scenes rendered by eomt_mm (no real images): '
                             'Cityscapes layout and 19 train ids (255 = ignore), plus an '
                             'anomaly split (0 inlier, 1 anomaly, 255 void).'),
                classes=list(CLASSES), anomaly_types=list(ANOMALY_TYPES),
                splits=dict(train=params['num_train'], val=params['num_val'],
                            anomaly=params['num_anomaly']),
                files=files, digest=_digest(files))
            (partial / _MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True),
                                             encoding='utf-8')
            if root.exists():
                os.replace(root, stale)
            os.replace(partial, root)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        shutil.rmtree(stale, ignore_errors=True)
    return info(manifest, generated=True)
