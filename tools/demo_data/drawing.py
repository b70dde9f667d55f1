"""Drawing primitives of the demo scenes: rasterisation, the canvas, the camera, colours.

Everything is numpy + OpenCV. Polygons are rasterised inside their clipped bounding box with
1/16 px vertex precision; the :class:`Canvas` paints image, semantic label and anomaly mask
together; the :class:`Camera` projects world metres (X right, z ahead, h up) to pixels.
"""
from __future__ import annotations

import math
from typing import Sequence

import cv2
import numpy as np

from .labels import IGNORE_INDEX

Region = tuple[slice, slice, np.ndarray]


def raster_polygons(polys: Sequence[np.ndarray], height: int, width: int) -> Region | None:
    """Rasterises the union of polygons inside their clipped bounding box.

    Vertices keep 1/16 px precision. Each polygon is filled by its own call: one fillPoly
    over several contours would cancel overlapping areas (even-odd rule).
    """
    polys = [np.asarray(p, dtype=np.float64) for p in polys]
    polys = [p for p in polys if len(p) and np.all(np.isfinite(p))]
    if not polys:
        return None
    allpts = np.concatenate(polys)
    x0 = max(int(math.floor(allpts[:, 0].min())), 0)
    x1 = min(int(math.ceil(allpts[:, 0].max())) + 1, width)
    y0 = max(int(math.floor(allpts[:, 1].min())), 0)
    y1 = min(int(math.ceil(allpts[:, 1].max())) + 1, height)
    if x0 >= x1 or y0 >= y1:
        return None
    local = np.zeros((y1 - y0, x1 - x0), np.uint8)
    for pts in polys:
        fixed = np.round((pts - (x0, y0)) * 16).astype(np.int32)
        cv2.fillPoly(local, [fixed], 1, cv2.LINE_8, 4)
    mask = local.astype(bool)
    if not mask.any():
        return None
    return slice(y0, y1), slice(x0, x1), mask


def raster_polygon(pts: np.ndarray, height: int, width: int) -> Region | None:
    """Rasterises one polygon (see :func:`raster_polygons`)."""
    return raster_polygons([pts], height, width)


def ellipse_points(cx: float, cy: float, ax: float, ay: float, angle: float = 0.0,
                   n: int = 28) -> np.ndarray:
    """``n`` vertices of the ellipse at (cx, cy) with half-axes (ax, ay), rotated by ``angle``."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    ca, sa = math.cos(angle), math.sin(angle)
    ex, ey = ax * np.cos(t), ay * np.sin(t)
    return np.stack([cx + ca * ex - sa * ey, cy + sa * ex + ca * ey], axis=1)


def segment_quad(p0: Sequence[float], p1: Sequence[float], width_px: float) -> np.ndarray:
    """Quad around the segment p0-p1 with the given width in pixels (at least one pixel)."""
    p0, p1 = np.asarray(p0, np.float64), np.asarray(p1, np.float64)
    d = p1 - p0
    n = np.hypot(*d)
    if n < 1e-9:
        d, n = np.array([0.0, 1.0]), 1.0
    off = np.array([-d[1], d[0]]) / n * max(width_px, 1.0) / 2
    return np.stack([p0 + off, p1 + off, p1 - off, p0 - off])


def smooth_noise(rng: np.random.Generator, height: int, width: int, cell: float) -> np.ndarray:
    """Zero-mean, unit-std value noise with features of about ``cell`` pixels."""
    gh, gw = max(2, int(height / cell) + 2), max(2, int(width / cell) + 2)
    grid = rng.standard_normal((gh, gw)).astype(np.float32)
    field = cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC)
    return (field - field.mean()) / (field.std() + 1e-6)


class Canvas:
    """Image, semantic label and anomaly mask painted together, back to front.

    Args:
        height: Image height in pixels.
        width: Image width in pixels.
        rng: Random generator of this frame (textures are drawn from it).
    """

    def __init__(self, height: int, width: int, rng: np.random.Generator) -> None:
        self.h, self.w = height, width
        self.img = np.zeros((height, width, 3), np.float32)
        self.lbl = np.full((height, width), IGNORE_INDEX, np.uint8)
        self.anomaly = np.zeros((height, width), bool)
        self.fine = rng.standard_normal((height, width)).astype(np.float32)
        self.smooth = smooth_noise(rng, height, width, 10.0)
        self.blotch = smooth_noise(rng, height, width, 2.5)

    def paint(self, region: Region | None, cls: int | None, colour, *,
              texture: np.ndarray | None = None, strength: float = 0.0, fine: float = 0.04,
              anomaly: bool = False) -> None:
        """Paints ``region`` with a colour modulated by textures and sets its label.

        Args:
            region: Output of a rasteriser; None paints nothing.
            cls: Train id written to the label, or None to leave the label unchanged
                (paint details of the object below, e.g. windows of a building).
            colour: RGB triple or a full-size (H, W, 3) colour field.
            texture: Full-size (H, W) zero-mean field; multiplies the colour by
                ``1 + strength * texture``.
            strength: Amplitude of ``texture``.
            fine: Amplitude of the per-pixel noise.
            anomaly: Whether the painted pixels belong to an out-of-distribution object.
        """
        if region is None:
            return
        ys, xs, m = region
        yy, xx = np.nonzero(m)
        yy += ys.start
        xx += xs.start
        colour = np.asarray(colour, np.float32)
        base = colour[yy, xx] if colour.ndim == 3 else colour
        gain = 1.0 + fine * self.fine[yy, xx]
        if texture is not None and strength:
            gain = gain + strength * texture[yy, xx]
        self.img[yy, xx] = base * gain[:, None]
        if cls is not None:
            self.lbl[yy, xx] = cls
        self.anomaly[yy, xx] = anomaly

    def poly(self, pts, cls, colour, **kw) -> None:
        """Paints one polygon (keywords as :meth:`paint`)."""
        self.paint(raster_polygon(pts, self.h, self.w), cls, colour, **kw)

    def polys(self, polys, cls, colour, **kw) -> None:
        """Paints many same-coloured polygons at once (windows, fence posts, lane dashes)."""
        self.paint(raster_polygons(polys, self.h, self.w), cls, colour, **kw)

    def ring(self, outer, inner, cls, colour, **kw) -> None:
        """Paints the area between two closed outlines (wheel tyres seen through)."""
        reg = raster_polygon(outer, self.h, self.w)
        if reg is None:
            return
        ys, xs, m = reg
        hole = np.zeros((self.h, self.w), bool)
        ireg = raster_polygon(inner, self.h, self.w)
        if ireg is not None:
            hole[ireg[0], ireg[1]] = ireg[2]
        m = m & ~hole[ys, xs]
        if m.any():
            self.paint((ys, xs, m), cls, colour, **kw)


class Camera:
    """Pinhole camera looking along the road: world metres (X right, z ahead, h up) -> pixels.

    Args:
        height: Image height.
        width: Image width.
        horizon: Row of the horizon.
        vanish_x: Column of the vanishing point.
        cam_height: Camera height above the road in metres.
        near: Distance in metres of the ground seen at the bottom row.
    """

    def __init__(self, height: int, width: int, horizon: float, vanish_x: float,
                 cam_height: float = 1.5, near: float = 5.0) -> None:
        self.h, self.w = height, width
        self.yh, self.vx = horizon, vanish_x
        self.cam_h, self.near = cam_height, near
        self.focal = (height - horizon) / cam_height * near

    def scale(self, z: float) -> float:
        """Pixels per metre at distance z."""
        return self.focal / z

    def project(self, pts3d) -> np.ndarray:
        """(N, 3) world points (X, z, h) -> (N, 2) pixel coordinates."""
        p = np.asarray(pts3d, np.float64).reshape(-1, 3)
        s = self.focal / p[:, 1]
        return np.stack([self.vx + s * p[:, 0], self.yh + s * (self.cam_h - p[:, 2])], axis=1)

    def point(self, x: float, z: float, hgt: float) -> np.ndarray:
        """Pixel coordinates of one world point."""
        return self.project([(x, z, hgt)])[0]

    def billboard(self, x0: float, x1: float, z: float, h0: float, h1: float) -> np.ndarray:
        """Rectangle facing the camera at distance z."""
        return self.project([(x0, z, h0), (x1, z, h0), (x1, z, h1), (x0, z, h1)])

    def side(self, x: float, z0: float, z1: float, h0: float, h1: float) -> np.ndarray:
        """Rectangle in the vertical plane X = x, parallel to the road."""
        return self.project([(x, z0, h0), (x, z1, h0), (x, z1, h1), (x, z0, h1)])

    def ground(self, x0: float, x1: float, z0: float, z1: float) -> np.ndarray:
        """Rectangle on the road plane (h = 0)."""
        return self.project([(x0, z0, 0), (x1, z0, 0), (x1, z1, 0), (x0, z1, 0)])

    def side_circle(self, x: float, zc: float, hc: float, r: float, n: int = 20) -> np.ndarray:
        """Circle in the vertical plane X = x (a wheel seen from the side)."""
        t = np.linspace(0, 2 * np.pi, n, endpoint=False)
        return self.project(np.stack([np.full(n, x), zc + r * np.cos(t), hc + r * np.sin(t)], 1))

    def front_circle(self, xc: float, z: float, hc: float, r: float, n: int = 20) -> np.ndarray:
        """Circle facing the camera at distance z."""
        t = np.linspace(0, 2 * np.pi, n, endpoint=False)
        return self.project(np.stack([xc + r * np.cos(t), np.full(n, z), hc + r * np.sin(t)], 1))

    def line(self, a3d, b3d, width_m: float) -> np.ndarray:
        """Quad of a bar ``width_m`` metres wide between two world points."""
        a, b = self.project([a3d, b3d])
        z = min(a3d[1], b3d[1])
        return segment_quad(a, b, width_m * self.scale(z))


# ------------------------------------------------------------------------------------------
# Colours
# ------------------------------------------------------------------------------------------


def jitter(rng: np.random.Generator, rgb, amount: float = 12.0) -> np.ndarray:
    """``rgb`` with each channel moved by up to ``amount``, clipped to [0, 255] (float32)."""
    return np.clip(np.asarray(rgb, np.float32) + rng.uniform(-amount, amount, 3), 0, 255)


def pick(rng: np.random.Generator, choices):
    """One element of ``choices``, uniformly."""
    return choices[int(rng.integers(len(choices)))]


FACADES = ((196, 186, 164), (168, 84, 62), (138, 138, 144), (222, 212, 188), (118, 98, 88),
           (188, 158, 118), (160, 170, 180), (205, 180, 150))
VEHICLE_PAINTS = ((200, 30, 30), (30, 50, 160), (230, 230, 230), (25, 25, 28), (120, 120, 125),
                  (170, 175, 180), (20, 90, 50), (210, 180, 40), (90, 20, 30), (60, 110, 170))
SKIN = ((235, 195, 160), (200, 150, 110), (150, 100, 70), (95, 60, 40))
CLOTHES = ((200, 40, 40), (40, 60, 150), (30, 30, 30), (220, 220, 210), (60, 120, 60),
           (240, 170, 30), (110, 70, 140), (120, 120, 120), (90, 60, 40))
PANTS = ((30, 35, 60), (25, 25, 25), (80, 80, 85), (60, 45, 30), (150, 140, 120))


def random_green(rng: np.random.Generator) -> np.ndarray:
    """A foliage green (float32 RGB)."""
    return np.array([rng.uniform(35, 85), rng.uniform(85, 145), rng.uniform(25, 65)], np.float32)

