"""Inference geometry as pure tensor functions: sliding windows and undoing the test pipeline.

Nothing here knows a model: the segmentors call these functions, and the tests check them on
plain tensors.

* Sliding windows follow the reference placement (tue-mps/eomt ``training/lightning_module.py``,
  ``window_imgs_semantic`` / ``revert_window_logits_semantic``): resize the image so its short
  side equals the crop, cover the long side with ``ceil(long / crop)`` square crops spread
  evenly, average the overlaps, resize back.
* Restoring a map to its image's original geometry undoes what mmseg's test pipeline and data
  preprocessor did: cut the padding (``img_padding_size`` / ``padding_size`` in the metainfo,
  ``(left, right, top, bottom)``), undo the flip, resize to ``ori_shape``.
* Window footprints on a label-scale canvas (:func:`canvas_spans`, :func:`stitch_on_canvas`)
  serve maps that must be made at label resolution per window (anomaly scores: each window has
  its own queries, so its mask logits cannot be stitched, only maps computed from them).
"""
from __future__ import annotations

import math
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    'SlideLayout', 'ImageGeometry', 'window_layout', 'crop_windows', 'stitch_windows',
    'image_geometry', 'restore_geometry', 'CanvasSpans', 'canvas_spans', 'stitch_on_canvas'
]


class SlideLayout(NamedTuple):
    """Placement of square windows on an input.

    Attributes:
        crop: Window side.
        input: ``(H, W)`` of the input.
        resized: ``(H', W')`` after resizing the short side to ``crop``.
        along_h: Whether windows are stacked along the height (portrait inputs).
        starts: Start of each window along the long axis of the resized input.
    """
    crop: int
    input: Tuple[int, int]
    resized: Tuple[int, int]
    along_h: bool
    starts: Tuple[int, ...]


class ImageGeometry(NamedTuple):
    """What the test pipeline did to one image.

    Attributes:
        pad: ``(left, right, top, bottom)`` padding added at the input resolution.
        flip: ``'horizontal'``, ``'vertical'`` or None.
        out: ``(h, w)`` to restore (``ori_shape``, else the unpadded input size).
    """
    pad: Tuple[int, int, int, int]
    flip: Optional[str]
    out: Tuple[int, int]


def window_layout(height: int, width: int, crop: int) -> SlideLayout:
    """Reference window placement for an input of ``height x width``.

    Args:
        height: Input height.
        width: Input width.
        crop: Side of the square windows.

    Returns:
        The :class:`SlideLayout`.
    """
    factor = max(crop / height, crop / width)
    new_h, new_w = round(height * factor), round(width * factor)
    along_h = new_h > new_w
    long_side = new_h if along_h else new_w
    num_crops = math.ceil(long_side / crop)
    overlap = num_crops * crop - long_side
    step = crop - (overlap / (num_crops - 1) if overlap > 0 else 0)
    starts = tuple(int(j * step) for j in range(num_crops))
    return SlideLayout(crop, (height, width), (new_h, new_w), along_h, starts)


def crop_windows(inputs: Tensor, layout: SlideLayout) -> Tensor:
    """Resize ``inputs`` ``[B, C, H, W]`` to ``layout.resized`` and cut the windows.

    Args:
        inputs: Images at ``layout.input``.
        layout: From :func:`window_layout`.

    Returns:
        ``[N * B, C, crop, crop]``; window ``j`` of image ``i`` is at ``j * B + i``.
    """
    resized = inputs
    if tuple(layout.resized) != tuple(inputs.shape[-2:]):
        # antialias matches the reference's PIL bilinear resize when shrinking.
        resized = F.interpolate(inputs, size=layout.resized, mode='bilinear',
                                align_corners=False, antialias=True)
    crop = layout.crop
    windows = [resized[:, :, s:s + crop] if layout.along_h else resized[..., s:s + crop]
               for s in layout.starts]
    return torch.cat(windows, dim=0)


def stitch_windows(values: Tensor, layout: SlideLayout, batch: int) -> Tensor:
    """Average per-window maps where windows overlap and resize back to the input size.

    Args:
        values: ``[N * B, C, crop, crop]`` in :func:`crop_windows` order.
        layout: The layout the windows were cut with.
        batch: B.

    Returns:
        ``[B, C, H, W]`` at ``layout.input``.
    """
    crop = layout.crop
    new_h, new_w = layout.resized
    total = values.new_zeros(batch, values.shape[1], new_h, new_w)
    count = values.new_zeros(1, 1, new_h, new_w)
    for j, s in enumerate(layout.starts):
        part = values[j * batch:(j + 1) * batch]
        if layout.along_h:
            total[:, :, s:s + crop] += part
            count[:, :, s:s + crop] += 1
        else:
            total[..., s:s + crop] += part
            count[..., s:s + crop] += 1
    out = total / count
    if (new_h, new_w) != tuple(layout.input):
        out = F.interpolate(out, size=layout.input, mode='bilinear', align_corners=False)
    return out


def image_geometry(meta: Optional[dict], input_hw: Sequence[int]) -> ImageGeometry:
    """Read padding, flip and the size to restore from an image's metainfo.

    Args:
        meta: mmseg metainfo (``ori_shape``, ``img_padding_size`` or ``padding_size``,
            ``flip``, ``flip_direction``), or None (nothing to undo).
        input_hw: ``(H, W)`` of the (padded) network input.

    Returns:
        The :class:`ImageGeometry`.

    Raises:
        ValueError: For a flip direction other than horizontal or vertical.
    """
    input_hw = (int(input_hw[0]), int(input_hw[1]))
    if meta is None:
        return ImageGeometry((0, 0, 0, 0), None, input_hw)
    pad = tuple(int(p) for p in meta.get('img_padding_size',
                                         meta.get('padding_size', [0, 0, 0, 0])))
    flip = None
    if meta.get('flip', False):
        flip = meta.get('flip_direction')
        if flip not in ('horizontal', 'vertical'):
            raise ValueError(f'unknown flip_direction {flip!r} in img_meta; expected '
                             "'horizontal' or 'vertical'")
    left, right, top, bottom = pad
    content = (input_hw[0] - top - bottom, input_hw[1] - left - right)
    out = tuple(int(s) for s in meta['ori_shape'][:2]) if 'ori_shape' in meta else content
    return ImageGeometry(pad, flip, out)


def restore_geometry(value: Tensor, geometry: ImageGeometry,
                     align_corners: bool = False) -> Tensor:
    """``[1, C, H, W]`` -> ``[1, C, h, w]``: cut the padding, undo the flip, resize.

    Args:
        value: A map at the (padded) input resolution.
        geometry: From :func:`image_geometry`.
        align_corners: ``F.interpolate``'s flag for the final resize.

    Returns:
        The map at ``geometry.out``.
    """
    left, right, top, bottom = geometry.pad
    height, width = value.shape[-2:]
    value = value[..., top:height - bottom, left:width - right]
    if geometry.flip == 'horizontal':
        value = value.flip(dims=(3, ))
    elif geometry.flip == 'vertical':
        value = value.flip(dims=(2, ))
    if tuple(value.shape[-2:]) != tuple(geometry.out):
        value = F.interpolate(value, size=geometry.out, mode='bilinear',
                              align_corners=align_corners)
    return value


class CanvasSpans(NamedTuple):
    """Window footprints on a label-scale canvas.

    Attributes:
        canvas: ``(H_c, W_c)``: the whole padded input scaled by ``out / content`` per axis, so
            that after cutting the scaled padding it has the label's size.
        spans: ``(lo, hi)`` of each window along the long axis, in canvas pixels (rounded).
        along_h: Whether the spans are rows.
        geometry: The geometry that restores the canvas to ``out`` (scaled padding, same flip).
    """
    canvas: Tuple[int, int]
    spans: Tuple[Tuple[int, int], ...]
    along_h: bool
    geometry: ImageGeometry

    def window_size(self, index: int) -> Tuple[int, int]:
        """Canvas footprint ``(h, w)`` of window ``index``."""
        lo, hi = self.spans[index]
        return (hi - lo, self.canvas[1]) if self.along_h else (self.canvas[0], hi - lo)


def canvas_spans(layout: SlideLayout, geometry: ImageGeometry) -> CanvasSpans:
    """Footprints of the windows of ``layout`` on the label-scale canvas of an image.

    Window edges are rounded to whole canvas pixels; the final resize of
    :func:`stitch_on_canvas` only absorbs that rounding (at most a pixel per side).

    Args:
        layout: The sliding-window layout of the input.
        geometry: The image's geometry relative to ``layout.input``.

    Returns:
        The :class:`CanvasSpans`.
    """
    left, right, top, bottom = geometry.pad
    height, width = layout.input
    scale_h = geometry.out[0] / (height - top - bottom)
    scale_w = geometry.out[1] / (width - left - right)
    canvas = (round(height * scale_h), round(width * scale_w))
    new_h, new_w = layout.resized
    # Canvas pixels per resized-input pixel along the windowed (long) axis.
    axis_scale = canvas[0] / new_h if layout.along_h else canvas[1] / new_w
    spans = tuple((round(s * axis_scale), round((s + layout.crop) * axis_scale))
                  for s in layout.starts)
    pad = (round(left * scale_w), round(right * scale_w), round(top * scale_h),
           round(bottom * scale_h))
    return CanvasSpans(canvas, spans, layout.along_h,
                       ImageGeometry(pad, geometry.flip, tuple(geometry.out)))


def stitch_on_canvas(maps: List[Tensor], spans: CanvasSpans) -> Tensor:
    """Average per-window maps on the canvas and restore the result to the label size.

    Args:
        maps: One ``[C, h_j, w_j]`` map per window, of size ``spans.window_size(j)``.
        spans: From :func:`canvas_spans`.

    Returns:
        ``[C, h, w]`` at ``spans.geometry.out``.
    """
    total = None
    count = torch.zeros(spans.canvas, device=maps[0].device)
    for (lo, hi), value in zip(spans.spans, maps):
        region = (slice(lo, hi), slice(None)) if spans.along_h else (slice(None), slice(lo, hi))
        if total is None:
            total = value.new_zeros(value.shape[0], *spans.canvas)
        count[region] += 1
        total[(slice(None), ) + region] += value
    return restore_geometry((total / count)[None], spans.geometry)[0]
