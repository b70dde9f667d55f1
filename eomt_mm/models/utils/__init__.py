"""Model-side helpers: inference geometry (sliding windows, undoing padding / flip / resize)."""
from .geometry import (CanvasSpans, ImageGeometry, SlideLayout, canvas_spans, crop_windows,
                       image_geometry, restore_geometry, stitch_on_canvas, stitch_windows,
                       window_layout)

__all__ = [
    'CanvasSpans', 'ImageGeometry', 'SlideLayout', 'canvas_spans', 'crop_windows',
    'image_geometry', 'restore_geometry', 'stitch_on_canvas', 'stitch_windows', 'window_layout'
]
