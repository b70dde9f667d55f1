"""Bad input to tools/train.py and tools/test.py on the demo config: a missing
data folder, a corrupt image or label map, a missing pretrained file. Each
stops with a message that names the file and the fix, and the checkpoints an
earlier run left in the work dir stay byte-identical."""
import shutil

import cv2
import numpy as np
import pytest

from _demo_tools_common import (DEMO_CONFIG, data_options, load_tool,
                                make_demo_data, run_options, snapshot,
                                train_args)
from eomt_mm.datasets.transforms import (CorruptImageError,
                                         LoadAnnotationsChecked,
                                         LoadImageFromFileChecked)
from eomt_mm.engine.data_check import check_data_folders


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A finished 6-iteration demo run (checkpoints at 3 and 6)."""
    root = tmp_path_factory.mktemp('bad_input')
    data_root = make_demo_data(root / 'demo')
    train, test = load_tool('train'), load_tool('test')
    work_dir = root / 'work'
    train.main(train_args(work_dir, data_root, tag='base'))
    before = snapshot(work_dir)
    assert {'iter_3.pth', 'iter_6.pth', 'last_checkpoint'} <= set(before)
    return dict(root=root, data_root=data_root, train=train, test=test,
                work_dir=work_dir, before=before)


@pytest.fixture
def data_copy(trained, tmp_path):
    """A private copy of the demo data that a test may damage."""
    dst = tmp_path / 'demo'
    shutil.copytree(trained['data_root'], dst)
    return dst


def _resume(trained, data_root, *extra):
    trained['train'].main(
        train_args(trained['work_dir'], data_root, *extra, tag='resume',
                   flags=['--resume']))


def _assert_checkpoints_intact(trained):
    assert snapshot(trained['work_dir']) == trained['before']


def test_missing_data_folder_names_folder_and_fix(trained, tmp_path):
    missing = tmp_path / 'no_such_demo'
    with pytest.raises(FileNotFoundError) as info:
        _resume(trained, missing)
    msg = str(info.value)
    assert str(missing) in msg
    assert 'train_dataloader.dataset.data_root' in msg
    assert 'python tools/make_demo_data.py' in msg  # the demo config's hint
    assert 'data_root=DIR' in msg
    _assert_checkpoints_intact(trained)

    # test.py checks its own dataloader the same way.
    with pytest.raises(FileNotFoundError, match='test_dataloader.*no_such'):
        trained['test'].main([
            str(DEMO_CONFIG),
            str(trained['work_dir'] / 'iter_6.pth'), '--work-dir',
            str(tmp_path / 'test'), '--cfg-options', *run_options('t'),
            *data_options(missing)
        ])
    _assert_checkpoints_intact(trained)


def test_missing_split_folder_is_named(trained, data_copy):
    shutil.rmtree(data_copy / 'gtFine' / 'train')
    with pytest.raises(FileNotFoundError) as info:
        _resume(trained, data_copy)
    msg = str(info.value)
    assert str(data_copy / 'gtFine' / 'train') in msg
    assert 'data_prefix.seg_map_path' in msg
    # The folders that exist are not reported.
    assert 'img_path' not in msg
    _assert_checkpoints_intact(trained)


def test_check_data_folders_walks_wrappers_and_reports_empty(tmp_path):
    (tmp_path / 'a' / 'img').mkdir(parents=True)
    (tmp_path / 'a' / 'img' / 'x.png').write_bytes(b'x')
    (tmp_path / 'a' / 'ann').mkdir()  # exists but empty
    cfg = dict(train_dataloader=dict(dataset=dict(
        type='ConcatDataset',
        datasets=[
            dict(data_root=str(tmp_path / 'a'),
                 data_prefix=dict(img_path='img', seg_map_path='ann')),
            dict(type='RepeatDataset', times=2, dataset=dict(
                data_root=str(tmp_path / 'a'), ann_file='list.txt')),
            dict(data_root=str(tmp_path / 'b'),
                 data_prefix=dict(img_path='img')),
        ])),
        val_dataloader=None,
        data_preparation='ask the maintainers')
    with pytest.raises(FileNotFoundError) as info:
        check_data_folders(cfg)
    msg = str(info.value)
    assert f"{tmp_path / 'a' / 'ann'}' is empty" in msg
    assert f"{tmp_path / 'a' / 'list.txt'}' does not exist" in msg
    assert f"{tmp_path / 'b'}' does not exist" in msg
    # Folders inside a missing data_root are not listed one by one.
    assert str(tmp_path / 'b' / 'img') not in msg
    assert 'ask the maintainers' in msg
    assert 'img_path' not in msg
    # Complete data passes; without a hint the README is quoted.
    (tmp_path / 'a' / 'ann' / 'x.png').write_bytes(b'x')
    check_data_folders(dict(train_dataloader=dict(dataset=dict(
        data_root=str(tmp_path / 'a'),
        data_prefix=dict(img_path='img', seg_map_path='ann')))))
    with pytest.raises(FileNotFoundError, match='README.*Data preparation'):
        check_data_folders(dict(train_dataloader=dict(dataset=dict(
            data_root=str(tmp_path / 'c')))))


def _corrupt(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 3])  # a truncated download


def test_corrupt_training_image_names_file_and_fix(trained, data_copy):
    image = sorted((data_copy / 'leftImg8bit' / 'train').rglob('*.png'))[5]
    _corrupt(image)
    # Resuming with a longer schedule replays the 6 trained batches (12 draws
    # over 8 images, a permutation per epoch), so every image is read. (A run
    # already at max_iters stops before that: FinishedRunHook.)
    with pytest.raises(CorruptImageError) as info:
        _resume(trained, data_copy, 'train_cfg.max_iters=8')
    msg = str(info.value)
    assert str(image) in msg
    assert 'corrupt or truncated' in msg
    assert 'make_demo_data.py' in msg and 're-download' in msg
    _assert_checkpoints_intact(trained)


def test_corrupt_label_map_in_evaluation(trained, data_copy, tmp_path):
    label = sorted((data_copy / 'gtFine' / 'val').rglob('*.png'))[0]
    label.write_bytes(b'not a png at all' * 8)
    with pytest.raises(CorruptImageError) as info:
        trained['test'].main([
            str(DEMO_CONFIG),
            str(trained['work_dir'] / 'iter_6.pth'), '--work-dir',
            str(tmp_path / 'test'), '--cfg-options', *run_options('t'),
            *data_options(data_copy)
        ])
    assert f"label map file '{label}'" in str(info.value)
    _assert_checkpoints_intact(trained)


def test_checked_loaders_match_upstream_on_good_files(trained, tmp_path):
    from mmcv.transforms import LoadImageFromFile
    from mmseg.datasets.transforms import LoadAnnotations
    image = sorted((trained['data_root'] / 'leftImg8bit').rglob('*.png'))[0]
    label = sorted((trained['data_root'] / 'gtFine').rglob('*.png'))[0]

    def sample():
        return dict(img_path=str(image), seg_map_path=str(label),
                    reduce_zero_label=False, seg_fields=[])

    ours = LoadAnnotationsChecked()(LoadImageFromFileChecked(
        to_float32=True)(sample()))
    ref = LoadAnnotations()(LoadImageFromFile(to_float32=True)(sample()))
    assert ours['img'].dtype == np.float32
    np.testing.assert_array_equal(ours['img'], ref['img'])
    np.testing.assert_array_equal(ours['gt_seg_map'], ref['gt_seg_map'])
    assert ours['ori_shape'] == ref['ori_shape'] == (128, 256)

    # Upstream behaviour kept: ignore_empty returns None, a missing file
    # stays a FileNotFoundError (not "corrupt").
    bad = tmp_path / 'bad.png'
    bad.write_bytes(b'\x89PNG garbage')
    assert LoadImageFromFileChecked(ignore_empty=True)(
        dict(img_path=str(bad))) is None
    with pytest.raises(CorruptImageError, match='bad.png'):
        LoadImageFromFileChecked()(dict(img_path=str(bad)))
    with pytest.raises(FileNotFoundError):
        LoadImageFromFileChecked()(dict(img_path=str(tmp_path / 'gone.png')))
    assert cv2.imread(str(bad)) is None  # the file really is undecodable


def test_missing_pretrained_file_names_file_and_conversion(
        trained, tmp_path):
    missing = tmp_path / 'checkpoints' / 'dinov2_vitb14_reg4_to_p16.pth'
    with pytest.raises(FileNotFoundError) as info:
        _resume(trained, trained['data_root'],
                'model.backbone.init_cfg.type=Pretrained',
                f'model.backbone.init_cfg.checkpoint={missing}',
                'model.backbone.init_cfg.prefix=backbone.')
    msg = str(info.value)
    assert str(missing) in msg
    assert 'model.backbone.init_cfg.checkpoint' in msg
    # The conversion command for this backbone (patch 8, 4 registers).
    assert (f'python tools/convert_weights.py dinov2_vitb14_reg4_pretrain.pth '
            f'{missing} --format meta-dinov2 --patch-size 8') in msg
    assert 'facebookresearch/dinov2' in msg
    _assert_checkpoints_intact(trained)
