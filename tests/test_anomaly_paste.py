"""PasteOutliers on a generated COCO-style source: statistics, labels, bounds, exclusions."""
import json

import cv2
import numpy as np
import pytest
from mmseg.registry import TRANSFORMS

from eomt_mm.anomaly.paste_outliers import (decode_segmentation,
                                                        rle_string_to_counts)

GREEN = (0, 255, 0)
RED = (0, 0, 255)  # BGR


def _encode_rle_string(counts):
    """COCO's compressed RLE writer, written out for the round-trip test."""
    out = []
    for i, value in enumerate(counts):
        x = value - counts[i - 2] if i > 2 else value
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = not ((c & 0x10) == 0 and x == 0 or (c & 0x10) != 0 and x == -1)
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return ''.join(out)


def _mask_to_counts(mask):
    flat = mask.T.reshape(-1)  # column-major
    counts, current, run = [], False, 0
    for v in flat:
        if v != current:
            counts.append(run)
            run, current = 0, v
        run += 1
    counts.append(run)
    return counts


@pytest.fixture()
def coco_source(tmp_path):
    img_dir = tmp_path / 'images'
    img_dir.mkdir()
    images, anns = [], []
    # 0: a green disc (polygon), kept ; 1: a green square (compressed RLE), kept ;
    # 2: red person square, must be excluded ; 3: no annotation at all, skipped.
    for i in range(4):
        img = np.full((40, 50, 3), 30, np.uint8)
        images.append(dict(id=i, file_name=f'src_{i}.png', height=40, width=50))
        if i == 0:
            cv2.circle(img, (25, 20), 12, GREEN, -1)
            angles = np.linspace(0, 2 * np.pi, 40, endpoint=False)
            poly = np.stack([25 + 12 * np.cos(angles), 20 + 12 * np.sin(angles)], 1)
            anns.append(dict(id=1, image_id=0, category_id=18, iscrowd=0, area=450.0,
                             segmentation=[poly.reshape(-1).tolist()]))
        elif i == 1:
            img[5:25, 10:40] = GREEN
            mask = np.zeros((40, 50), bool)
            mask[5:25, 10:40] = True
            anns.append(dict(id=2, image_id=1, category_id=18, iscrowd=1, area=600.0,
                             segmentation=dict(size=[40, 50],
                                               counts=_encode_rle_string(_mask_to_counts(mask)))))
        elif i == 2:
            img[5:35, 5:45] = RED
            anns.append(dict(id=3, image_id=2, category_id=1, iscrowd=0, area=1200.0,
                             segmentation=[[5, 5, 45, 5, 45, 35, 5, 35]]))
        cv2.imwrite(str(img_dir / f'src_{i}.png'), img)
    categories = [dict(id=1, name='person'), dict(id=18, name='dog')]
    ann_file = tmp_path / 'instances.json'
    ann_file.write_text(json.dumps(dict(images=images, annotations=anns, categories=categories)))
    return str(ann_file), str(img_dir)


def _sample(shape=(64, 96)):
    return dict(img=np.full(shape + (3,), 128, np.uint8),
                gt_seg_map=np.random.default_rng(0).integers(0, 19, shape).astype(np.uint8))


def test_rle_codec_round_trip():
    rng = np.random.default_rng(0)
    mask = rng.random((13, 17)) < 0.4
    counts = _mask_to_counts(mask)
    assert rle_string_to_counts(_encode_rle_string(counts)) == counts
    np.testing.assert_array_equal(
        decode_segmentation(dict(size=[13, 17], counts=_encode_rle_string(counts)), 13, 17), mask)
    np.testing.assert_array_equal(decode_segmentation(dict(size=[13, 17], counts=counts), 13, 17),
                                  mask)
    square = decode_segmentation([[2, 2, 6, 2, 6, 5, 2, 5]], 8, 8)
    assert square[2:6, 2:7].all() and square.sum() == 4 * 5


def test_paste_statistics_labels_and_bounds(coco_source):
    ann_file, img_dir = coco_source
    t = TRANSFORMS.build(dict(type='PasteOutliers', ann_file=ann_file, img_dir=img_dir, prob=0.3,
                              scale_range=(0.2, 0.5), paste_label=254, seed=3))
    assert len(t.sources) == 2  # person image and empty image dropped
    n, pasted, sources = 400, 0, set()
    for _ in range(n):
        sample = _sample()
        before = sample['gt_seg_map'].copy()
        out = t(sample)
        info = out['outlier_paste']
        changed = np.any(out['img'] != 128, axis=-1)
        # The excluded (red) object never appears; pasted pixels are exactly the source object.
        assert not np.any(np.all(out['img'] == RED, axis=-1))
        if info is None:
            assert not changed.any()
            np.testing.assert_array_equal(out['gt_seg_map'], before)
            continue
        pasted += 1
        sources.add(info['source'])
        x0, y0, x1, y1 = info['bbox']
        assert 0 <= x0 < x1 <= 96 and 0 <= y0 < y1 <= 64  # nothing outside the image
        assert max(x1 - x0, y1 - y0) <= round(0.5 * 64) + 1
        assert max(x1 - x0, y1 - y0) >= round(0.2 * 64) - 1
        labelled = out['gt_seg_map'] == 254
        assert labelled.sum() == info['area'] > 0
        np.testing.assert_array_equal(labelled, changed)
        np.testing.assert_array_equal(out['gt_seg_map'][~labelled], before[~labelled])
    # Binomial(400, 0.3): 4 standard deviations is about +-37.
    assert abs(pasted - 0.3 * n) < 37
    assert sources == {'src_0.png', 'src_1.png'}


def test_paste_seed_determinism_and_ignore_label(coco_source):
    ann_file, img_dir = coco_source
    cfg = dict(type='PasteOutliers', ann_file=ann_file, img_dir=img_dir, prob=1.0, seed=7)
    a = [TRANSFORMS.build(cfg)(_sample()) for _ in range(1)][0]
    b = TRANSFORMS.build(cfg)(_sample())
    assert a['outlier_paste'] == b['outlier_paste']
    np.testing.assert_array_equal(a['img'], b['img'])
    assert (a['gt_seg_map'] == 255).sum() == a['outlier_paste']['area']  # default: ignore


def test_paste_errors(coco_source, tmp_path):
    ann_file, img_dir = coco_source
    with pytest.raises(FileNotFoundError, match='nope.json'):
        TRANSFORMS.build(dict(type='PasteOutliers', ann_file=str(tmp_path / 'nope.json'),
                              img_dir=img_dir))
    with pytest.raises(ValueError, match='no usable source'):
        TRANSFORMS.build(dict(type='PasteOutliers', ann_file=ann_file, img_dir=img_dir,
                              exclude_classes=['person', 'dog']))
    with pytest.raises(ValueError, match='scale_range'):
        TRANSFORMS.build(dict(type='PasteOutliers', ann_file=ann_file, img_dir=img_dir,
                              scale_range=(0.5, 0.2)))
    t = TRANSFORMS.build(dict(type='PasteOutliers', ann_file=ann_file, img_dir=img_dir, prob=1.0))
    bad = _sample()
    bad['gt_seg_map'] = bad['gt_seg_map'][:10]
    with pytest.raises(ValueError, match='differ'):
        t(bad)
