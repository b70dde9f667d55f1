"""Inference geometry as pure tensor functions (no model): windows, stitching, restoring."""
import pytest
import torch
import torch.nn.functional as F

from eomt_mm.models.utils.geometry import (ImageGeometry, canvas_spans, crop_windows,
                                           image_geometry, restore_geometry, stitch_on_canvas,
                                           stitch_windows, window_layout)


@pytest.mark.parametrize('hw, resized, along_h, starts', [
    ((1024, 2048), (1024, 2048), False, (0, 1024)),      # Cityscapes at crop 1024: 2 windows
    ((64, 160), (64, 160), False, (0, 48, 96)),          # 32 px of overlap spread over 2 gaps
    ((160, 64), (160, 64), True, (0, 48, 96)),
    ((32, 64), (64, 128), False, (0, 64)),               # short side resized up to the crop
    ((64, 64), (64, 64), False, (0, )),
])
def test_window_layout_reference_placement(hw, resized, along_h, starts):
    layout = window_layout(*hw, crop=64 if hw[0] < 1000 else 1024)
    assert layout.input == hw and layout.resized == resized
    assert layout.along_h == along_h and layout.starts == starts


def test_crop_then_stitch_is_identity_on_a_smooth_map():
    x = torch.arange(64 * 160, dtype=torch.float32).reshape(1, 1, 64, 160).repeat(2, 3, 1, 1)
    layout = window_layout(64, 160, 64)
    windows = crop_windows(x, layout)
    assert windows.shape == (3 * 2, 3, 64, 64)
    # Window j of image i sits at j * B + i.
    torch.testing.assert_close(windows[2 * 2 + 1], x[1, :, :, 96:160])
    torch.testing.assert_close(stitch_windows(windows, layout, batch=2), x)


def test_stitch_averages_overlaps_and_resizes_back():
    layout = window_layout(32, 64, 64)          # resized 64 x 128, windows at 0 and 64
    values = torch.stack([torch.full((1, 64, 64), 1.0), torch.full((1, 64, 64), 3.0)])
    out = stitch_windows(values, layout, batch=1)
    assert out.shape == (1, 1, 32, 64)
    big = torch.cat([values[0], values[1]], -1)[None]
    torch.testing.assert_close(out, F.interpolate(big, size=(32, 64), mode='bilinear',
                                                  align_corners=False))
    overlap = window_layout(64, 160, 64)
    ones = torch.stack([torch.full((1, 64, 64), v) for v in (0.0, 2.0, 4.0)])
    out = stitch_windows(ones, overlap, batch=1)
    assert float(out[0, 0, 0, 50]) == 1.0 and float(out[0, 0, 0, 100]) == 3.0


def test_image_geometry_and_restore():
    meta = dict(ori_shape=(20, 25), padding_size=[0, 7, 0, 4], flip=True,
                flip_direction='horizontal')
    geometry = image_geometry(meta, (32, 32))
    assert geometry == ImageGeometry((0, 7, 0, 4), 'horizontal', (20, 25))
    value = torch.randn(1, 2, 32, 32)
    expected = F.interpolate(value[..., :28, :25].flip(-1), size=(20, 25), mode='bilinear',
                             align_corners=False)
    torch.testing.assert_close(restore_geometry(value, geometry), expected)
    # img_padding_size (mmseg's SegDataPreProcessor at test time) wins over padding_size.
    assert image_geometry(dict(img_padding_size=[1, 2, 3, 4], padding_size=[0, 0, 0, 0]),
                          (16, 16)).pad == (1, 2, 3, 4)
    assert image_geometry(None, (8, 9)) == ImageGeometry((0, 0, 0, 0), None, (8, 9))
    assert image_geometry(dict(padding_size=[0, 2, 0, 1]), (8, 9)).out == (7, 7)
    vertical = image_geometry(dict(flip=True, flip_direction='vertical'), (4, 4))
    torch.testing.assert_close(restore_geometry(value[..., :4, :4], vertical),
                               value[..., :4, :4].flip(-2))
    with pytest.raises(ValueError, match='flip_direction'):
        image_geometry(dict(flip=True, flip_direction='diagonal'), (4, 4))


def test_canvas_spans_and_stitch_on_canvas():
    # Input 64 x 160 with right padding 10 (content 64 x 150), label 32 x 75, flipped:
    # canvas 32 x 80, windows at 0, 48, 96 -> columns [0, 32), [24, 56), [48, 80).
    layout = window_layout(64, 160, 64)
    geometry = image_geometry(dict(ori_shape=(32, 75), padding_size=[0, 10, 0, 0], flip=True,
                                   flip_direction='horizontal'), (64, 160))
    spans = canvas_spans(layout, geometry)
    assert spans.canvas == (32, 80) and spans.spans == ((0, 32), (24, 56), (48, 80))
    assert spans.window_size(1) == (32, 32) and spans.geometry.pad == (0, 5, 0, 0)
    maps = [torch.full((1, 32, 32), v) for v in (0.0, 2.0, 4.0)]
    out = stitch_on_canvas(maps, spans)
    count = torch.zeros(32, 80)
    total = torch.zeros(1, 32, 80)
    for (lo, hi), m in zip(spans.spans, maps):
        count[:, lo:hi] += 1
        total[:, :, lo:hi] += m
    torch.testing.assert_close(out, (total / count)[..., :75].flip(-1))
