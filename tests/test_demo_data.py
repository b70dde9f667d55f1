"""The demo data set (tools/make_demo_data.py, tools/demo_data/) and the dataset configs."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
# The renderer is a package of tools/ (not of eomt_mm); appended, so nothing earlier is shadowed.
if str(REPO / 'tools') not in sys.path:
    sys.path.append(str(REPO / 'tools'))

from demo_data import (CLASSES, DEMO_VERSION, demo_dataset_is_current,  # noqa: E402
                       generate_demo_dataset, render_demo_scene, writer)

CONFIGS = REPO / 'configs' / '_base_' / 'datasets'
SMALL = dict(num_train=4, num_val=2, num_anomaly=3)


def _disk_hashes(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob('*')) if p.is_file()
    }


def _read(path: Path) -> np.ndarray:
    arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert arr is not None, path
    return arr


@pytest.fixture(scope='session')
def full_demo(tmp_path_factory) -> Path:
    """The default demo data set (48 / 12 / 12 images of 128x256)."""
    info = generate_demo_dataset(tmp_path_factory.mktemp('full') / 'demo')
    assert info.generated
    # Generous bound for a loaded CI machine; about 4.5 s on 2 cores.
    assert info.seconds < 30
    return info.root


@pytest.fixture()
def small_demo(tmp_path) -> Path:
    return generate_demo_dataset(tmp_path / 'demo', **SMALL).root


# ------------------------------------------------------------------------- layout and content
def test_layout_is_cityscapes_and_anomaly_benchmark(full_demo):
    imgs = sorted(full_demo.glob('leftImg8bit/train/*/*_leftImg8bit.png'))
    gts = sorted(full_demo.glob('gtFine/train/*/*_gtFine_labelTrainIds.png'))
    assert len(imgs) == len(gts) == 48
    assert {p.parent.name for p in imgs} == {'demotown', 'synthburg'}
    for img in imgs:  # every image has its label, named the Cityscapes way
        stem = img.name[:-len('_leftImg8bit.png')]
        assert (full_demo / 'gtFine/train' / img.parent.name /
                f'{stem}_gtFine_labelTrainIds.png').is_file()
    assert len(list(full_demo.glob('leftImg8bit/val/valcity/*_leftImg8bit.png'))) == 12
    assert len(list(full_demo.glob('gtFine/val/valcity/*_gtFine_labelTrainIds.png'))) == 12
    a_imgs = sorted(p.name for p in (full_demo / 'anomaly/images').iterdir())
    a_lbls = sorted(p.name for p in (full_demo / 'anomaly/labels_masks').iterdir())
    assert a_imgs == a_lbls and len(a_imgs) == 12
    manifest = json.loads((full_demo / 'manifest.json').read_text())
    assert manifest['version'] == DEMO_VERSION
    assert manifest['classes'] == list(CLASSES)
    assert manifest['files'] == {k: v for k, v in _disk_hashes(full_demo).items()
                                 if k != 'manifest.json'}
    img = _read(imgs[0])
    assert img.shape == (128, 256, 3) and img.dtype == np.uint8
    gt = _read(gts[0])
    assert gt.shape == (128, 256) and gt.dtype == np.uint8


def test_semantic_labels_use_the_19_train_ids(full_demo):
    counts = np.zeros(256, np.int64)
    for split in ('train', 'val'):
        for path in sorted(full_demo.glob(f'gtFine/{split}/*/*.png')):
            gt = _read(path)
            values = set(np.unique(gt).tolist())
            assert values <= set(range(19)) | {255}, (path, values)
            # Every frame is a street: road and sky, and several other classes.
            assert {0, 10} <= values and len(values - {255}) >= 5, (path, values)
            counts += np.bincount(gt.ravel(), minlength=256)
    assert (counts[:19] > 0).all(), f'classes never drawn: {np.flatnonzero(counts[:19] == 0)}'
    share = counts[:19] / counts[:19].sum()
    assert 0.2 < share[0] < 0.5  # road
    assert share[2] > 0.1 and share[8] > 0.05 and share[13] > 0.03  # building, vegetation, car
    assert 0 < counts[255] / counts.sum() < 0.05  # ego-vehicle bonnet only


def test_anomaly_split_labels(full_demo):
    min_px = round(writer.MIN_ANOMALY_FRACTION * 128 * 256)
    for path in sorted((full_demo / 'anomaly/labels_masks').iterdir()):
        mask = _read(path)
        assert mask.shape == (128, 256)
        assert set(np.unique(mask).tolist()) <= {0, 1, 255}, path
        assert (mask == 1).sum() >= min_px, path  # an anomaly in every frame
        # Anomalies lie on the road: below the upper third of the frame.
        rows = np.flatnonzero((mask == 1).any(1))
        assert rows.max() > 128 * 0.4, path
    img = _read(sorted((full_demo / 'anomaly/images').iterdir())[0])
    assert img.shape == (128, 256, 3)


def test_classes_are_learnable_but_not_trivial(full_demo):
    """A per-pixel Gaussian classifier on colour and row beats chance, far from perfect."""

    def features(split):
        xs, ys = [], []
        for path in sorted(full_demo.glob(f'leftImg8bit/{split}/*/*.png')):
            img = _read(path)[..., ::-1].astype(np.float64) / 255
            gt = _read(Path(str(path).replace('leftImg8bit', 'gtFine', 1).replace(
                '_leftImg8bit.png', '_gtFine_labelTrainIds.png')))
            row = np.broadcast_to(np.linspace(0, 1, img.shape[0])[:, None], gt.shape)
            keep = gt != 255
            xs.append(np.concatenate([img[keep], row[keep][:, None]], 1)[::7])
            ys.append(gt[keep][::7])
        return np.concatenate(xs), np.concatenate(ys)

    x_tr, y_tr = features('train')
    x_va, y_va = features('val')
    scores = []
    for k in range(19):
        xk = x_tr[y_tr == k]
        mu, cov = xk.mean(0), np.cov(xk.T) + 1e-4 * np.eye(4)
        inv, (_, logdet) = np.linalg.inv(cov), np.linalg.slogdet(cov)
        d = x_va - mu
        scores.append(-0.5 * np.einsum('ni,ij,nj->n', d, inv, d) - 0.5 * logdet +
                      np.log(len(xk) / len(x_tr)))
    pred = np.argmax(scores, 0)
    acc = (pred == y_va).mean()
    ious = [((pred == k) & (y_va == k)).sum() / max(((pred == k) | (y_va == k)).sum(), 1)
            for k in range(19) if (y_va == k).any()]
    # Chance (majority class) is about 0.35; texture and shape cues are left for a real model.
    assert 0.55 < acc < 0.9, acc
    assert 0.1 < np.mean(ious) < 0.5, np.mean(ious)


# ---------------------------------------------------------------------------- determinism etc.
def test_same_parameters_give_the_same_bytes(tmp_path, small_demo):
    again = generate_demo_dataset(tmp_path / 'again', **SMALL)
    assert _disk_hashes(again.root) == _disk_hashes(small_demo)
    other = generate_demo_dataset(tmp_path / 'other', **SMALL, seed=1)
    first = 'leftImg8bit/train/demotown/demotown_000000_000019_leftImg8bit.png'
    assert _disk_hashes(other.root)[first] != _disk_hashes(small_demo)[first]
    # A frame depends only on (seed, split, index), not on the split sizes.
    bigger = generate_demo_dataset(tmp_path / 'bigger', num_train=6, num_val=1, num_anomaly=1)
    assert _disk_hashes(bigger.root)[first] == _disk_hashes(small_demo)[first]


def test_scene_renderer_is_a_pure_function_of_the_rng():
    a = render_demo_scene(np.random.default_rng(7), 96, 160, num_anomalies=2)
    b = render_demo_scene(np.random.default_rng(7), 96, 160, num_anomalies=2)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    image, label, anomaly = a
    assert image.shape == (96, 160, 3) and label.shape == anomaly.shape == (96, 160)
    assert (label[anomaly] == 255).all()  # anomalies are no Cityscapes class


def test_second_call_does_nothing(small_demo):
    before = {p: p.stat().st_mtime_ns for p in small_demo.rglob('*')}
    info = generate_demo_dataset(small_demo, **SMALL)
    assert not info.generated
    assert {p: p.stat().st_mtime_ns for p in small_demo.rglob('*')} == before
    assert demo_dataset_is_current(small_demo, **SMALL)
    assert not demo_dataset_is_current(small_demo, **dict(SMALL, num_val=3))


def test_stale_or_damaged_data_is_regenerated(small_demo):
    reference = _disk_hashes(small_demo)
    manifest = json.loads((small_demo / 'manifest.json').read_text())
    manifest['version'] = DEMO_VERSION - 1
    (small_demo / 'manifest.json').write_text(json.dumps(manifest))
    assert generate_demo_dataset(small_demo, **SMALL).generated
    assert _disk_hashes(small_demo) == reference

    victim = next(small_demo.glob('gtFine/val/*/*.png'))
    victim.write_bytes(b'not a png')
    assert not demo_dataset_is_current(small_demo, **SMALL)
    assert generate_demo_dataset(small_demo, **SMALL).generated
    assert _disk_hashes(small_demo) == reference

    # Other parameters replace the data set (it is ours: the manifest says so).
    info = generate_demo_dataset(small_demo, **dict(SMALL, num_train=2))
    assert info.generated and len(list(small_demo.glob('leftImg8bit/train/*/*.png'))) == 2


def test_data_written_before_the_renderer_moved_is_replaced_not_refused(small_demo):
    """A manifest naming the renderer's earlier home (eomt_mm.datasets.demo_roads) is ours."""
    reference = _disk_hashes(small_demo)
    manifest = json.loads((small_demo / 'manifest.json').read_text())
    current_writer = manifest['generator']
    manifest['generator'] = 'eomt_mm.datasets.demo_roads'
    (small_demo / 'manifest.json').write_text(json.dumps(manifest, indent=1, sort_keys=True))
    assert not demo_dataset_is_current(small_demo, **SMALL)
    info = generate_demo_dataset(small_demo, **SMALL)
    assert info.generated
    assert _disk_hashes(small_demo) == reference  # the same bytes, manifest included
    assert json.loads((small_demo / 'manifest.json').read_text())['generator'] == current_writer


def test_leftovers_of_an_interrupted_run_are_removed(tmp_path):
    for leftover in ('.demo.partial', '.demo.old'):
        (tmp_path / leftover / 'gtFine').mkdir(parents=True)
        (tmp_path / leftover / 'gtFine' / 'half.png').write_bytes(b'\x89PNG')
    info = generate_demo_dataset(tmp_path / 'demo', **SMALL)
    assert info.generated
    assert sorted(p.name for p in tmp_path.iterdir()) == ['.demo.lock', 'demo']


def test_failure_while_writing_leaves_the_previous_data_intact(tmp_path, monkeypatch):
    root = generate_demo_dataset(tmp_path / 'demo', **SMALL).root
    reference = _disk_hashes(root)
    calls = {'n': 0}
    real_encode = writer._encode_png

    def encode_then_die(array):
        calls['n'] += 1
        if calls['n'] == 5:
            raise KeyboardInterrupt  # e.g. Ctrl-C half-way through
        return real_encode(array)

    monkeypatch.setattr(writer, '_encode_png', encode_then_die)
    with pytest.raises(KeyboardInterrupt):
        generate_demo_dataset(root, **SMALL, force=True)
    assert _disk_hashes(root) == reference
    assert not (tmp_path / '.demo.partial').exists()
    # A first run that dies leaves no data set at all (never a partial one).
    calls['n'] = 0
    with pytest.raises(KeyboardInterrupt):
        generate_demo_dataset(tmp_path / 'fresh', **SMALL)
    assert not (tmp_path / 'fresh').exists() and not (tmp_path / '.fresh.partial').exists()


def test_foreign_folder_is_never_overwritten(tmp_path):
    own = tmp_path / 'mydata'
    own.mkdir()
    (own / 'important.txt').write_text('keep me')
    with pytest.raises(FileExistsError, match='mydata.*manifest.json'):
        generate_demo_dataset(own, **SMALL)
    assert (own / 'important.txt').read_text() == 'keep me'
    a_file = tmp_path / 'file'
    a_file.write_text('x')
    with pytest.raises(FileExistsError, match='not a directory'):
        generate_demo_dataset(a_file, **SMALL)


@pytest.mark.parametrize('bad, match', [
    (dict(num_train=0), 'num_train must be an integer >= 1, got 0'),
    (dict(num_anomaly=-1), 'num_anomaly must be an integer >= 0'),
    (dict(height=32), 'height must be an integer >= 64, got 32'),
    (dict(width=100.5), 'width must be an integer'),
    (dict(seed=-3), 'seed must be an integer >= 0'),
    (dict(num_val=True), 'num_val must be an integer'),
])
def test_bad_parameters_are_named(tmp_path, bad, match):
    with pytest.raises(ValueError, match=match):
        generate_demo_dataset(tmp_path / 'demo', **bad)
    assert not (tmp_path / 'demo').exists()


def test_other_sizes_and_no_anomaly_split(tmp_path):
    info = generate_demo_dataset(tmp_path / 'demo', num_train=1, num_val=1, num_anomaly=0,
                                 height=96, width=96)
    assert not (info.root / 'anomaly').exists()
    assert _read(next(info.root.glob('leftImg8bit/val/*/*.png'))).shape == (96, 96, 3)


def test_command_line_tool(tmp_path):
    cmd = [sys.executable, str(REPO / 'tools' / 'make_demo_data.py'), '--out', str(tmp_path / 'd'),
           '--num-train', '2', '--num-val', '1', '--num-anomaly', '1']
    first = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert 'demo data generated' in first.stdout and str(tmp_path / 'd') in first.stdout
    second = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert second.returncode == 0 and 'already up to date' in second.stdout
    bad = subprocess.run(cmd + ['--height', '8'], capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode == 2 and 'height must be an integer >= 64, got 8' in bad.stderr


# ----------------------------------------------------------------------- configs and loaders
def _config(name: str, **data_roots):
    from mmengine.config import Config
    cfg = Config.fromfile(str(CONFIGS / name))
    for key, root in data_roots.items():
        cfg[key].dataset.data_root = str(root)
    return cfg


def _loader(dataloader_cfg):
    from mmengine.registry import init_default_scope
    from mmengine.runner import Runner
    init_default_scope('mmseg')
    cfg = dict(dataloader_cfg)
    cfg.update(num_workers=0, persistent_workers=False)
    return Runner.build_dataloader(cfg, seed=0)


@pytest.mark.parametrize('name', ['cityscapes_1024x1024.py', 'cityscapes_640x640.py',
                                  'ade20k_512x512.py', 'demo_roads.py'])
def test_every_pipeline_builds(name):
    from mmengine.registry import init_default_scope
    from mmseg.registry import TRANSFORMS
    init_default_scope('mmseg')
    cfg = _config(name)
    pipelines = [k for k in cfg.keys() if k.endswith('pipeline')]
    assert 'train_pipeline' in pipelines and 'test_pipeline' in pipelines
    for key in pipelines:
        built = [TRANSFORMS.build(t) for t in cfg[key]]
        assert type(built[-1]).__name__ == 'PackSegInputs', key
    for key in ('train_dataloader', 'val_dataloader', 'test_dataloader', 'val_evaluator'):
        assert key in cfg


def test_reference_crops_and_jitter():
    cfg1024, cfg640 = _config('cityscapes_1024x1024.py'), _config('cityscapes_640x640.py')
    assert cfg1024.crop_size == (1024, 1024) and cfg640.crop_size == (640, 640)
    for cfg, crop in ((cfg1024, 1024), (cfg640, 640)):
        steps = {t['type']: t for t in cfg.train_dataloader.dataset.pipeline}
        assert steps['RandomResize']['scale'] == (crop, crop)
        assert steps['RandomResize']['ratio_range'] == (0.5, 2.0)
        assert steps['RandomCrop']['crop_size'] == (crop, crop)
        assert 'PhotoMetricDistortion' in steps and steps['RandomFlip']['prob'] == 0.5
        test = {t['type']: t for t in cfg.val_dataloader.dataset.pipeline}
        assert min(test['Resize']['scale']) == crop  # short side at the crop size
    assert _config('ade20k_512x512.py').crop_size == (512, 512)


def test_demo_train_loader_through_cityscapes_dataset(full_demo):
    cfg = _config('demo_roads.py', train_dataloader=full_demo)
    assert cfg.train_dataloader.dataset.type == 'CityscapesDataset'
    loader = _loader(cfg.train_dataloader)
    assert len(loader.dataset) == 48
    assert tuple(loader.dataset.metainfo['classes']) == CLASSES
    it = iter(loader)
    for _ in range(3):
        batch = next(it)
        assert len(batch['inputs']) == 4
        for inp, sample in zip(batch['inputs'], batch['data_samples']):
            assert inp.dtype.is_floating_point is False and inp.shape[0] == 3
            assert inp.shape[1] <= 128 and inp.shape[2] <= 128
            gt = sample.gt_sem_seg.data
            assert gt.shape[1:] == inp.shape[1:]
            assert set(gt.unique().tolist()) <= set(range(19)) | {255}


def test_demo_val_and_anomaly_loaders(full_demo):
    cfg = _config('demo_roads.py', val_dataloader=full_demo)
    val = list(_loader(cfg.val_dataloader))
    assert len(val) == 12
    sample = val[0]['data_samples'][0]
    assert val[0]['inputs'][0].shape == (3, 128, 256)
    assert sample.gt_sem_seg.data.shape == (1, 128, 256)
    assert sample.metainfo['img_path'].endswith('_leftImg8bit.png')

    anomaly_cfg = _config('anomaly_demo_roads.py', test_dataloader=Path(full_demo) / 'anomaly')
    anomaly = list(_loader(anomaly_cfg.test_dataloader))
    assert len(anomaly) == 12
    for batch in anomaly:
        gt = batch['data_samples'][0].gt_sem_seg.data
        assert gt.shape == (1, 128, 256)
        assert set(gt.unique().tolist()) <= {0, 1, 255} and (gt == 1).any()
    assert anomaly_cfg.test_evaluator['type'] == 'AnomalyMetric'


def test_cityscapes_configs_read_cityscapes_layout(full_demo):
    """The real Cityscapes pipelines run on files in Cityscapes layout (the demo frames)."""
    for name, crop in (('cityscapes_1024x1024.py', 1024), ('cityscapes_640x640.py', 640)):
        cfg = _config(name, train_dataloader=full_demo, val_dataloader=full_demo)
        train = _loader(dict(cfg.train_dataloader, batch_size=2))
        batch = next(iter(train))
        for inp in batch['inputs']:
            # 128x256 frames fit into crop*s with s <= 2, so they are never cropped.
            assert inp.shape[1] <= crop and inp.shape[2] <= crop
        val = _loader(cfg.val_dataloader)
        first = next(iter(val))
        # Short side resized to the crop size; labels stay at the original resolution.
        assert first['inputs'][0].shape[1] == crop
        assert first['data_samples'][0].gt_sem_seg.data.shape == (1, 128, 256)


def test_ade20k_config_reads_ade_layout(tmp_path, full_demo):
    root = tmp_path / 'ADEChallengeData2016'
    for split, sub in (('training', 'train'), ('validation', 'val')):
        (root / 'images' / split).mkdir(parents=True)
        (root / 'annotations' / split).mkdir(parents=True)
        for i, path in enumerate(sorted(full_demo.glob(f'leftImg8bit/{sub}/*/*.png'))[:2]):
            cv2.imwrite(str(root / 'images' / split / f'ADE_{split}_{i:08d}.jpg'), _read(path))
            ann = np.full((128, 256), 5, np.uint8)
            ann[:10] = 0  # "other": ignored after reduce_zero_label
            cv2.imwrite(str(root / 'annotations' / split / f'ADE_{split}_{i:08d}.png'), ann)
    cfg = _config('ade20k_512x512.py', train_dataloader=root, val_dataloader=root)
    assert len(next(iter(_loader(cfg.train_dataloader)))['inputs']) == 2
    val = _loader(cfg.val_dataloader)
    assert len(val.dataset) == 2 and len(val.dataset.metainfo['classes']) == 150
    gt = next(iter(val))['data_samples'][0].gt_sem_seg.data
    assert gt[0, :10].eq(255).all() and gt[0, 10:].eq(4).all()


# ------------------------------------------------------------------------ prepare_cityscapes
def _prepare(args, **kw):
    return subprocess.run([sys.executable, str(REPO / 'tools' / 'prepare_cityscapes.py'), *args],
                          capture_output=True, text=True, **kw)


def test_prepare_cityscapes_names_missing_folders(tmp_path):
    res = _prepare([str(tmp_path / 'nowhere')])
    assert res.returncode == 2
    assert f'{tmp_path / "nowhere" / "leftImg8bit"} does not exist' in res.stderr
    assert 'gtFine_trainvaltest.zip' in res.stderr
    (tmp_path / 'cs' / 'leftImg8bit').mkdir(parents=True)
    (tmp_path / 'cs' / 'gtFine' / 'train').mkdir(parents=True)
    (tmp_path / 'cs' / 'gtFine' / 'val').mkdir(parents=True)
    res = _prepare([str(tmp_path / 'cs')])
    assert res.returncode == 2 and 'no *_gtFine_polygons.json under' in res.stderr


def _fake_cityscapes(root: Path) -> Path:
    polygons = {
        'imgHeight': 16, 'imgWidth': 32,
        'objects': [{'label': 'road', 'polygon': [[0, 8], [31, 8], [31, 15], [0, 15]]},
                    {'label': 'car', 'polygon': [[4, 4], [12, 4], [12, 12], [4, 12]]},
                    {'label': 'sky', 'polygon': [[0, 0], [31, 0], [31, 3], [0, 3]]}]}
    (root / 'leftImg8bit' / 'train' / 'aachen').mkdir(parents=True)
    (root / 'leftImg8bit' / 'val').mkdir(parents=True)
    for split, city in (('train', 'aachen'), ('val', 'lindau')):
        (root / 'gtFine' / split / city).mkdir(parents=True)
        (root / 'gtFine' / split / city /
         f'{city}_000000_000019_gtFine_polygons.json').write_text(json.dumps(polygons))
    return root


def test_prepare_cityscapes_without_cityscapesscripts_says_how_to_install(tmp_path):
    root = _fake_cityscapes(tmp_path / 'cs')
    # Hide the package if it happens to be installed: the error path must stay clear.
    blocker = tmp_path / 'block'
    (blocker / 'cityscapesscripts').mkdir(parents=True)
    (blocker / 'cityscapesscripts' / '__init__.py').write_text(
        'raise ImportError("blocked for the test")')
    env = dict(os.environ, PYTHONPATH=str(blocker))
    res = _prepare([str(root)], env=env)
    assert res.returncode == 2
    assert 'pip install cityscapesscripts' in res.stderr
    assert not list(root.rglob('*labelTrainIds*'))


def test_prepare_cityscapes_renders_train_ids(tmp_path):
    pytest.importorskip('cityscapesscripts.preparation.json2labelImg')
    root = _fake_cityscapes(tmp_path / 'cs')
    res = _prepare([str(root), '--nproc', '2'])
    assert res.returncode == 0, res.stderr
    out = root / 'gtFine/train/aachen/aachen_000000_000019_gtFine_labelTrainIds.png'
    gt = _read(out)
    assert gt[0, 0] == 10 and gt[14, 20] == 0 and gt[6, 6] == 13 and gt[5, 20] == 255
    assert not list(root.rglob('*.partial.png'))
    again = _prepare([str(root)])
    assert again.returncode == 0 and '0 label images written' in again.stdout
