"""Deterministic synthetic road scenes ("demo roads") in Cityscapes layout.

The built-in demo must train and evaluate on a fresh machine with no download, so the project
renders its own small data set instead of shipping or fetching one. Every image is a simple 3D
street drawn through a pinhole camera (road with lane marks, sidewalks, facades with windows,
trees, poles with signs and traffic lights, people, riders, cars, trucks, buses, trams,
motorcycles, bicycles), painted with class-specific colours and textures plus noise, blur and
lighting changes, so that the 19 Cityscapes classes are learnable but not trivially separable
by colour.

Layout written under ``out_dir`` (readable as-is by mmseg's ``CityscapesDataset``)::

    leftImg8bit/{train,val}/<city>/<city>_<seq>_<frame>_leftImg8bit.png       RGB
    gtFine/{train,val}/<city>/<city>_<seq>_<frame>_gtFine_labelTrainIds.png  uint8, 0..18, 255
    anomaly/images/demo_anomaly_<i>.png                                       RGB
    anomaly/labels_masks/demo_anomaly_<i>.png     uint8: 0 inlier, 1 anomaly, 255 void
    manifest.json                                 version, parameters, sha256 of every file

The anomaly split is held out (its own random streams) and contains, on the road, objects of
classes outside the 19 (animals, cardboard boxes, cones, tyres, rocks, planks, blobs with
unnatural colours and textures). Void (255) marks the ego-vehicle bonnet that some frames show;
the same bonnet is 255 (ignore) in the semantic labels, as in Cityscapes.

Generation is deterministic (the same parameters give the same bytes), idempotent (an up-to-date
manifest means nothing is written) and atomic (files go to a hidden sibling folder that is
renamed into place only when complete; a leftover from an interrupted run is removed first).
Only numpy and OpenCV are used.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

import cv2
import numpy as np

try:  # POSIX advisory lock so that concurrent callers (e.g. several ranks) do not race.
    import fcntl
except ImportError:  # pragma: no cover - Windows has no fcntl; generation still works there.
    fcntl = None

__all__ = [
    'DEMO_VERSION', 'CLASSES', 'IGNORE_INDEX', 'ANOMALY_TYPES', 'DemoDatasetInfo',
    'generate_demo_dataset', 'demo_dataset_is_current', 'render_demo_scene'
]

#: Bump when the rendering changes: an existing data set with another version is regenerated.
DEMO_VERSION = 1

CLASSES = ('road', 'sidewalk', 'building', 'wall', 'fence', 'pole', 'traffic light',
           'traffic sign', 'vegetation', 'terrain', 'sky', 'person', 'rider', 'car', 'truck',
           'bus', 'train', 'motorcycle', 'bicycle')
(ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE, LIGHT, SIGN, VEGETATION, TERRAIN, SKY, PERSON,
 RIDER, CAR, TRUCK, BUS, TRAIN, MOTORCYCLE, BICYCLE) = range(19)
IGNORE_INDEX = 255

ANOMALY_TYPES = ('animal', 'box', 'cone', 'tyre', 'rock', 'plank', 'odd_blob')

_MANIFEST = 'manifest.json'
_GENERATOR = 'eomt_mm.datasets.demo_roads'
_SPLIT_STREAM = {'train': 0, 'val': 1, 'anomaly': 2}
_TRAIN_CITIES = ('demotown', 'synthburg')
_VAL_CITY = 'valcity'
# Smallest anomaly area (pixels at 128x256) accepted in an anomaly frame; scaled with image area.
_MIN_ANOMALY_FRACTION = 80 / (128 * 256)


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


# ------------------------------------------------------------------------------------------
# Rasterisation helpers
# ------------------------------------------------------------------------------------------

Region = tuple[slice, slice, np.ndarray]


def _raster_polygons(polys: Sequence[np.ndarray], height: int, width: int) -> Region | None:
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


def _raster_polygon(pts: np.ndarray, height: int, width: int) -> Region | None:
    return _raster_polygons([pts], height, width)


def _ellipse_points(cx: float, cy: float, ax: float, ay: float, angle: float = 0.0,
                    n: int = 28) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    ca, sa = math.cos(angle), math.sin(angle)
    ex, ey = ax * np.cos(t), ay * np.sin(t)
    return np.stack([cx + ca * ex - sa * ey, cy + sa * ex + ca * ey], axis=1)


def _segment_quad(p0: Sequence[float], p1: Sequence[float], width_px: float) -> np.ndarray:
    """Quad around the segment p0-p1 with the given width in pixels (at least one pixel)."""
    p0, p1 = np.asarray(p0, np.float64), np.asarray(p1, np.float64)
    d = p1 - p0
    n = np.hypot(*d)
    if n < 1e-9:
        d, n = np.array([0.0, 1.0]), 1.0
    off = np.array([-d[1], d[0]]) / n * max(width_px, 1.0) / 2
    return np.stack([p0 + off, p1 + off, p1 - off, p0 - off])


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cell: float) -> np.ndarray:
    """Zero-mean, unit-std value noise with features of about ``cell`` pixels."""
    gh, gw = max(2, int(height / cell) + 2), max(2, int(width / cell) + 2)
    grid = rng.standard_normal((gh, gw)).astype(np.float32)
    field = cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC)
    return (field - field.mean()) / (field.std() + 1e-6)


class _Canvas:
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
        self.smooth = _smooth_noise(rng, height, width, 10.0)
        self.blotch = _smooth_noise(rng, height, width, 2.5)

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
        self.paint(_raster_polygon(pts, self.h, self.w), cls, colour, **kw)

    def polys(self, polys, cls, colour, **kw) -> None:
        """Paints many same-coloured polygons at once (windows, fence posts, lane dashes)."""
        self.paint(_raster_polygons(polys, self.h, self.w), cls, colour, **kw)

    def ring(self, outer, inner, cls, colour, **kw) -> None:
        """Paints the area between two closed outlines (wheel tyres seen through)."""
        reg = _raster_polygon(outer, self.h, self.w)
        if reg is None:
            return
        ys, xs, m = reg
        hole = np.zeros((self.h, self.w), bool)
        ireg = _raster_polygon(inner, self.h, self.w)
        if ireg is not None:
            hole[ireg[0], ireg[1]] = ireg[2]
        m = m & ~hole[ys, xs]
        if m.any():
            self.paint((ys, xs, m), cls, colour, **kw)


class _Camera:
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
        p = np.asarray(pts3d, np.float64).reshape(-1, 3)
        s = self.focal / p[:, 1]
        return np.stack([self.vx + s * p[:, 0], self.yh + s * (self.cam_h - p[:, 2])], axis=1)

    def point(self, x: float, z: float, hgt: float) -> np.ndarray:
        return self.project([(x, z, hgt)])[0]

    def billboard(self, x0: float, x1: float, z: float, h0: float, h1: float) -> np.ndarray:
        """Rectangle facing the camera at distance z."""
        return self.project([(x0, z, h0), (x1, z, h0), (x1, z, h1), (x0, z, h1)])

    def side(self, x: float, z0: float, z1: float, h0: float, h1: float) -> np.ndarray:
        """Rectangle in the vertical plane X = x, parallel to the road."""
        return self.project([(x, z0, h0), (x, z1, h0), (x, z1, h1), (x, z0, h1)])

    def ground(self, x0: float, x1: float, z0: float, z1: float) -> np.ndarray:
        return self.project([(x0, z0, 0), (x1, z0, 0), (x1, z1, 0), (x0, z1, 0)])

    def side_circle(self, x: float, zc: float, hc: float, r: float, n: int = 20) -> np.ndarray:
        t = np.linspace(0, 2 * np.pi, n, endpoint=False)
        return self.project(np.stack([np.full(n, x), zc + r * np.cos(t), hc + r * np.sin(t)], 1))

    def front_circle(self, xc: float, z: float, hc: float, r: float, n: int = 20) -> np.ndarray:
        t = np.linspace(0, 2 * np.pi, n, endpoint=False)
        return self.project(np.stack([xc + r * np.cos(t), np.full(n, z), hc + r * np.sin(t)], 1))

    def line(self, a3d, b3d, width_m: float) -> np.ndarray:
        a, b = self.project([a3d, b3d])
        z = min(a3d[1], b3d[1])
        return _segment_quad(a, b, width_m * self.scale(z))


# ------------------------------------------------------------------------------------------
# Colours
# ------------------------------------------------------------------------------------------

def _jitter(rng: np.random.Generator, rgb, amount: float = 12.0) -> np.ndarray:
    return np.clip(np.asarray(rgb, np.float32) + rng.uniform(-amount, amount, 3), 0, 255)


def _pick(rng: np.random.Generator, choices):
    return choices[int(rng.integers(len(choices)))]


_FACADES = ((196, 186, 164), (168, 84, 62), (138, 138, 144), (222, 212, 188), (118, 98, 88),
            (188, 158, 118), (160, 170, 180), (205, 180, 150))
_VEHICLE = ((200, 30, 30), (30, 50, 160), (230, 230, 230), (25, 25, 28), (120, 120, 125),
            (170, 175, 180), (20, 90, 50), (210, 180, 40), (90, 20, 30), (60, 110, 170))
_SKIN = ((235, 195, 160), (200, 150, 110), (150, 100, 70), (95, 60, 40))
_CLOTHES = ((200, 40, 40), (40, 60, 150), (30, 30, 30), (220, 220, 210), (60, 120, 60),
            (240, 170, 30), (110, 70, 140), (120, 120, 120), (90, 60, 40))
_PANTS = ((30, 35, 60), (25, 25, 25), (80, 80, 85), (60, 45, 30), (150, 140, 120))


def _green(rng: np.random.Generator) -> np.ndarray:
    return np.array([rng.uniform(35, 85), rng.uniform(85, 145), rng.uniform(25, 65)], np.float32)


# ------------------------------------------------------------------------------------------
# Scene elements. Each draws itself at a distance; the scene sorts them far to near.
# ------------------------------------------------------------------------------------------

def _draw_person(cv: _Canvas, cam: _Camera, rng, x: float, z: float, cls: int = PERSON,
                 seated: float = 0.0) -> None:
    """A pedestrian (or, with ``seated`` metres of lift, a rider) seen from front or back."""
    hp = rng.uniform(1.55, 1.9)
    skin, shirt, pants = _jitter(rng, _pick(rng, _SKIN), 8), _jitter(rng, _pick(
        rng, _CLOTHES)), _jitter(rng, _pick(rng, _PANTS))
    k = hp / 1.75
    base = seated
    hip, shoulder = base + 0.88 * k, base + 1.45 * k
    if seated:
        # Legs go down to the pedals, slightly spread.
        for sx in (-1, 1):
            cv.poly(cam.line((x + sx * 0.1, z, hip), (x + sx * 0.16, z, 0.35), 0.14), cls, pants)
    else:
        spread = rng.uniform(0.0, 0.18)
        for sx in (-1, 1):
            cv.poly(cam.line((x + sx * 0.09, z, hip), (x + sx * (0.09 + spread), z, 0.0),
                             0.15 * k), cls, pants)
    cv.poly(cam.billboard(x - 0.21 * k, x + 0.21 * k, z, hip - 0.05, shoulder), cls, shirt,
            texture=cv.blotch, strength=0.08)
    for sx in (-1, 1):
        hand_x = x + sx * rng.uniform(0.22, 0.4) * k
        cv.poly(cam.line((x + sx * 0.23 * k, z, shoulder - 0.05),
                         (hand_x, z, hip - rng.uniform(-0.1, 0.15)), 0.1 * k), cls, shirt)
    head_c = cam.point(x, z, shoulder + 0.16 * k)
    r = 0.12 * k * cam.scale(z)
    cv.poly(_ellipse_points(head_c[0], head_c[1], max(r, 0.6), max(1.15 * r, 0.7)), cls, skin)
    if rng.random() < 0.5 or seated:  # hair or helmet
        top = cam.point(x, z, shoulder + 0.21 * k)
        hair = _jitter(rng, (40, 30, 20), 20) if not seated else _jitter(rng, _pick(rng,
                                                                                     _CLOTHES))
        cv.poly(_ellipse_points(top[0], top[1], max(1.05 * r, 0.6), max(0.75 * r, 0.5)), cls,
                hair)


def _draw_two_wheeler(cv: _Canvas, cam: _Camera, rng, x: float, z: float, motor: bool,
                      rider: bool) -> None:
    """Bicycle or motorcycle in the plane X = x (riding along the road), optional rider."""
    cls = MOTORCYCLE if motor else BICYCLE
    r = 0.32 if motor else 0.34
    half = 0.7 if motor else 0.52
    tyre = (22, 22, 24)
    frame = _jitter(rng, _pick(rng, _VEHICLE), 20)
    for dz in (-half, half):
        outer = cam.side_circle(x, z + dz, r, r)
        inner = cam.side_circle(x, z + dz, r, r * (0.45 if motor else 0.78))
        cv.ring(outer, inner, cls, tyre)
        if motor:
            cv.poly(inner, cls, (150, 150, 155))
    if motor:
        cv.poly(cam.project([(x, z - half, r), (x, z - 0.2, 0.95), (x, z + 0.45, 1.0),
                             (x, z + half, r), (x, z + 0.1, 0.35)]), cls, frame,
                texture=cv.smooth, strength=0.05)
        cv.poly(cam.billboard(x - 0.35, x + 0.35, z + half - 0.1, 0.85, 1.05), cls, (40, 40, 40))
    else:
        pts = [(x, z - half, r), (x, z - 0.05, r), (x, z - 0.15, r + 0.55), (x, z + 0.35, r + 0.5),
               (x, z + half, r)]
        for a, b in zip(pts[:-1], pts[1:]):
            cv.poly(cam.line(a, b, 0.05), cls, frame)
        cv.poly(cam.line(pts[1], pts[3], 0.05), cls, frame)
        cv.poly(cam.line((x - 0.25, z + 0.35, r + 0.75), (x + 0.25, z + 0.35, r + 0.75), 0.05),
                cls, (30, 30, 30))
    if rider:
        _draw_person(cv, cam, rng, x, z, cls=RIDER, seated=0.45 if motor else 0.35)


def _draw_box_vehicle(cv: _Canvas, cam: _Camera, rng, x: float, z: float, cls: int, width: float,
                      height: float, length: float, colour, *, cabin: bool, windows: str,
                      facing_back: bool = True) -> None:
    """A vehicle as a 3D box seen from behind (or the front) with its inner side visible."""
    body = np.asarray(colour, np.float32)
    glass = _jitter(rng, (45, 55, 70), 10)
    dark = (20, 20, 22)
    half = width / 2
    side_x = x - half if x - half > 0 else (x + half if x + half < 0 else None)
    low = 0.55 * height if cabin else height
    # Side face (further away than the rear face, so painted first).
    if side_x is not None:
        shade = body * 0.82
        cv.poly(cam.side(side_x, z, z + length, 0.25, low), cls, shade, texture=cv.smooth,
                strength=0.04)
        if cabin:
            cv.poly(cam.project([(side_x, z + 0.2 * length, low), (side_x, z + 0.85 * length, low),
                                 (side_x, z + 0.7 * length, height),
                                 (side_x, z + 0.32 * length, height)]), cls, shade)
            cv.poly(cam.project([(side_x, z + 0.26 * length, low + 0.05),
                                 (side_x, z + 0.8 * length, low + 0.05),
                                 (side_x, z + 0.68 * length, height - 0.08),
                                 (side_x, z + 0.35 * length, height - 0.08)]), None, glass)
        elif windows == 'band':
            cv.poly(cam.side(side_x, z + 0.3, z + length - 0.3, 0.45 * height, 0.8 * height),
                    None, glass)
            for zz in np.arange(z + 1.5, z + length - 0.5, 1.8):
                cv.poly(cam.side(side_x, zz, zz + 0.12, 0.45 * height, 0.8 * height), None,
                        body * 0.75)
        for zc in (z + 0.18 * length, z + 0.82 * length):
            rr = 0.33 if height < 2.2 else 0.5
            cv.poly(cam.side_circle(side_x, zc, rr, rr), cls, dark)
            cv.poly(cam.side_circle(side_x, zc, rr, rr * 0.5), cls, (130, 130, 135))
    # Rear (or front) face.
    for sx in (-1, 1):
        cv.poly(cam.billboard(x + sx * (half - 0.05) - 0.14, x + sx * (half - 0.05) + 0.14, z + 0.3,
                              0.0, 0.35), cls, dark)
    cv.poly(cam.billboard(x - half, x + half, z, 0.25, low), cls, body, texture=cv.smooth,
            strength=0.05)
    if cabin:
        zc = z + 0.2 * length
        cv.poly(cam.project([(x - half * 0.95, zc, low), (x + half * 0.95, zc, low),
                             (x + half * 0.78, zc, height), (x - half * 0.78, zc, height)]), cls,
                body * 0.95)
        cv.poly(cam.project([(x - half * 0.8, zc, low + 0.06), (x + half * 0.8, zc, low + 0.06),
                             (x + half * 0.68, zc, height - 0.07),
                             (x - half * 0.68, zc, height - 0.07)]), None, glass)
    elif windows == 'band':
        cv.poly(cam.billboard(x - half * 0.85, x + half * 0.85, z, 0.55 * height, 0.85 * height),
                None, glass)
    elif windows == 'doors':
        cv.poly(cam.line((x, z, 0.3), (x, z, height - 0.1), 0.04), None, body * 0.6)
    lamp = (230, 30, 30) if facing_back else (245, 240, 200)
    for sx in (-1, 1):
        cv.poly(cam.billboard(x + sx * half * 0.92 - 0.12, x + sx * half * 0.92 + 0.12, z,
                              0.45 * low + 0.15, 0.45 * low + 0.3), None, lamp)
    cv.poly(cam.billboard(x - 0.25, x + 0.25, z, 0.35, 0.48), None, (235, 235, 225))


def _draw_tram(cv: _Canvas, cam: _Camera, rng, x: float, z: float) -> None:
    colour = _jitter(rng, _pick(rng, ((230, 230, 225), (200, 40, 40), (235, 200, 40))), 10)
    # Rails are part of the road surface.
    for sx in (-0.72, 0.72):
        cv.poly(cam.ground(x + sx - 0.04, x + sx + 0.04, max(z - 30, cam.near * 0.5), z + 40),
                ROAD, (150, 150, 155))
    cv.poly(cam.line((x - 0.6, z + 3, 3.45), (x, z + 3, 4.6), 0.05), TRAIN, (40, 40, 40))
    cv.poly(cam.line((x + 0.6, z + 3, 3.45), (x, z + 3, 4.6), 0.05), TRAIN, (40, 40, 40))
    _draw_box_vehicle(cv, cam, rng, x, z, TRAIN, 2.4, 3.4, 28.0, colour, cabin=False,
                      windows='band')


def _draw_pole(cv: _Canvas, cam: _Camera, rng, x: float, z: float) -> None:
    top = rng.uniform(3.5, 7.5)
    grey = _jitter(rng, (110, 112, 115), 25)
    cv.poly(cam.billboard(x - 0.07, x + 0.07, z, 0.0, top), POLE, grey)
    kind = rng.random()
    if kind < 0.45:  # traffic sign
        h = top - rng.uniform(0.3, 0.8)
        c = cam.point(x, z, h)
        r = 0.33 * cam.scale(z)
        shape = int(rng.integers(5))
        if shape == 0:  # prohibition: red rim, white disc
            cv.poly(_ellipse_points(c[0], c[1], r, r), SIGN, (200, 25, 30))
            cv.poly(_ellipse_points(c[0], c[1], 0.72 * r, 0.72 * r), SIGN, (240, 240, 240))
        elif shape == 1:  # mandatory: blue disc, white arrow
            cv.poly(_ellipse_points(c[0], c[1], r, r), SIGN, (30, 80, 190))
            cv.poly(_segment_quad((c[0], c[1] + 0.6 * r), (c[0], c[1] - 0.6 * r), 0.25 * r), SIGN,
                    (240, 240, 240))
        elif shape == 2:  # warning triangle
            tri = np.array([(c[0], c[1] - 1.1 * r), (c[0] + r, c[1] + 0.7 * r),
                            (c[0] - r, c[1] + 0.7 * r)])
            cv.poly(tri, SIGN, (200, 25, 30))
            cv.poly(c + (tri - c) * 0.62, SIGN, (245, 240, 235))
        elif shape == 3:  # direction board
            cv.poly(cam.billboard(x - 0.5, x + 0.5, z, h - 0.3, h + 0.3), SIGN,
                    _jitter(rng, _pick(rng, ((30, 80, 190), (20, 120, 60), (240, 240, 240))), 8))
        else:  # stop
            cv.poly(_ellipse_points(c[0], c[1], r, r, np.pi / 8, 8), SIGN, (210, 20, 25))
    elif kind < 0.75:  # traffic light
        h = top - 0.1
        cv.poly(cam.billboard(x - 0.18, x + 0.18, z, h - 0.95, h), LIGHT, (32, 32, 34))
        lit = int(rng.integers(3))
        for i, colour in enumerate(((240, 30, 20), (245, 190, 20), (30, 220, 90))):
            c = cam.point(x, z, h - 0.17 - 0.3 * i)
            r = 0.1 * cam.scale(z)
            cv.poly(_ellipse_points(c[0], c[1], r, r), LIGHT,
                    colour if i == lit else np.asarray(colour) * 0.25)
    else:  # street lamp
        cv.poly(cam.line((x, z, top), (x + rng.choice([-1.2, 1.2]), z, top + 0.2), 0.1), POLE, grey)


def _draw_tree(cv: _Canvas, cam: _Camera, rng, x: float, z: float) -> None:
    trunk_h = rng.uniform(2.0, 3.5)
    cv.poly(cam.billboard(x - 0.14, x + 0.14, z, 0.0, trunk_h + 0.5), VEGETATION,
            _jitter(rng, (90, 65, 45), 12), texture=cv.blotch, strength=0.1)
    green = _green(rng)
    for _ in range(int(rng.integers(3, 6))):
        cx = x + rng.uniform(-1.0, 1.0)
        ch = trunk_h + rng.uniform(0.5, 2.0)
        c = cam.point(cx, z, ch)
        r = rng.uniform(1.0, 2.0) * cam.scale(z)
        cv.poly(_ellipse_points(c[0], c[1], r, r * rng.uniform(0.8, 1.1)), VEGETATION,
                _jitter(rng, green, 10), texture=cv.blotch, strength=0.3, fine=0.08)


# ------------------------------------------------------------------------------------------
# Anomalies: objects of no Cityscapes class, lying or standing on the road.
# ------------------------------------------------------------------------------------------

def _draw_anomaly(cv: _Canvas, cam: _Camera, rng, x: float, z: float, kind: str) -> None:
    s = cam.scale(z)
    shadow = cam.project([(x - 0.7, z - 0.3, 0), (x + 0.7, z - 0.3, 0), (x + 0.7, z + 0.6, 0),
                          (x - 0.7, z + 0.6, 0)])
    cv.poly(shadow, ROAD, (45, 45, 48), fine=0.05)
    a = dict(anomaly=True)
    if kind == 'animal':
        coat = _jitter(rng, _pick(rng, ((120, 75, 40), (30, 25, 22), (235, 230, 220),
                                        (150, 140, 130), (200, 120, 50))), 12)
        length, body_h = rng.uniform(0.9, 1.8), rng.uniform(0.45, 0.8)
        leg = rng.uniform(0.45, 0.8)
        facing = rng.choice([-1.0, 1.0])
        for lx in (-0.38, -0.25, 0.25, 0.38):
            cv.poly(cam.line((x + lx * length, z, leg + 0.1), (x + lx * length * 1.05, z, 0.0),
                             0.09), None, coat * 0.8, **a)
        c = cam.point(x, z, leg + body_h / 2)
        cv.poly(_ellipse_points(c[0], c[1], length / 2 * s, body_h / 2 * s), None, coat,
                texture=cv.blotch, strength=0.15, **a)
        if rng.random() < 0.5:  # spotted coat
            for _ in range(4):
                p = c + rng.uniform(-0.3, 0.3, 2) * (length * s, body_h * s)
                cv.poly(_ellipse_points(p[0], p[1], 0.12 * s, 0.09 * s, rng.uniform(0, 3)), None,
                        (20, 18, 16), **a)
        neck = cam.point(x + facing * length * 0.45, z, leg + body_h * 0.7)
        head = cam.point(x + facing * length * 0.62, z, leg + body_h * 1.05)
        cv.poly(_segment_quad(neck, head, 0.2 * s), None, coat, **a)
        cv.poly(_ellipse_points(head[0], head[1], 0.17 * s, 0.12 * s), None, coat * 0.9, **a)
        ear = cam.point(x + facing * length * 0.58, z, leg + body_h * 1.25)
        cv.poly(_segment_quad(head, ear, 0.07 * s), None, coat * 0.7, **a)
        tail = cam.point(x - facing * length * 0.65, z, leg + body_h * 0.2)
        cv.poly(_segment_quad(cam.point(x - facing * length * 0.48, z, leg + body_h * 0.7), tail,
                              0.05 * s), None, coat * 0.7, **a)
    elif kind == 'box':
        w, h, d = rng.uniform(0.4, 1.0), rng.uniform(0.3, 0.8), rng.uniform(0.4, 0.9)
        card = _jitter(rng, (190, 145, 90), 15)
        cv.poly(cam.project([(x - w / 2, z, h), (x + w / 2, z, h), (x + w / 2, z + d, h),
                             (x - w / 2, z + d, h)]), None, card * 1.15, **a)
        side_x = x + w / 2 if x + w / 2 < 0 else (x - w / 2 if x - w / 2 > 0 else None)
        if side_x is not None:  # the side facing the camera axis
            cv.poly(cam.side(side_x, z, z + d, 0, h), None, card * 0.8, **a)
        cv.poly(cam.billboard(x - w / 2, x + w / 2, z, 0, h), None, card, texture=cv.smooth,
                strength=0.05, **a)
        cv.poly(cam.billboard(x - w / 2, x + w / 2, z, h * 0.45, h * 0.55), None,
                (215, 200, 160), **a)
    elif kind == 'cone':
        h = rng.uniform(0.5, 0.9)
        orange = _jitter(rng, (250, 110, 20), 8)
        cv.poly(cam.billboard(x - 0.22, x + 0.22, z, 0, 0.05), None, (30, 30, 30), **a)
        cv.poly(cam.project([(x - 0.17, z, 0.05), (x + 0.17, z, 0.05), (x + 0.03, z, h),
                             (x - 0.03, z, h)]), None, orange, **a)
        cv.poly(cam.project([(x - 0.11, z, 0.4 * h), (x + 0.11, z, 0.4 * h),
                             (x + 0.08, z, 0.58 * h), (x - 0.08, z, 0.58 * h)]), None,
                (245, 245, 245), **a)
    elif kind == 'tyre':
        r = rng.uniform(0.3, 0.45)
        outer = cam.front_circle(x, z, r, r)
        cv.poly(outer, None, (28, 28, 30), texture=cv.blotch, strength=0.1, **a)
        cv.poly(cam.front_circle(x, z, r, r * 0.55), None, (150, 150, 160), **a)
        cv.poly(cam.front_circle(x, z, r, r * 0.2), None, (60, 60, 60), **a)
    elif kind == 'rock':
        n = int(rng.integers(6, 10))
        ang = np.sort(rng.uniform(0, 2 * np.pi, n))
        rad = rng.uniform(0.25, 0.6) * rng.uniform(0.7, 1.2, n)
        c = cam.point(x, z, rad.mean() * 0.8)
        pts = np.stack([c[0] + rad * np.cos(ang) * s, c[1] + 0.8 * rad * np.sin(ang) * s], 1)
        pts[:, 1] = np.minimum(pts[:, 1], cam.point(x, z, 0)[1])
        cv.poly(pts, None, _jitter(rng, (125, 110, 95), 20), texture=cv.blotch, strength=0.25,
                fine=0.1, **a)
    elif kind == 'plank':
        length, ang = rng.uniform(1.2, 2.4), rng.uniform(-0.6, 0.6)
        dx, dz = math.cos(ang) * length / 2, math.sin(ang) * length / 2
        wood = _jitter(rng, (160, 110, 60), 15)
        top = cam.project([(x - dx - 0.1, z - dz, 0.08), (x + dx - 0.1, z + dz, 0.08),
                           (x + dx + 0.1, z + dz, 0.08), (x - dx + 0.1, z - dz, 0.08)])
        front = cam.project([(x - dx - 0.1, z - dz, 0.0), (x + dx - 0.1, z + dz, 0.0),
                             (x + dx - 0.1, z + dz, 0.08), (x - dx - 0.1, z - dz, 0.08)])
        cv.poly(front, None, wood * 0.7, **a)
        cv.poly(top, None, wood, texture=cv.smooth, strength=0.1, **a)
    elif kind == 'odd_blob':
        c = cam.point(x, z, rng.uniform(0.3, 0.6))
        ax, ay = rng.uniform(0.35, 0.8) * s, rng.uniform(0.3, 0.6) * s
        pts = _ellipse_points(c[0], c[1], ax, ay, rng.uniform(-0.4, 0.4), 16)
        pts += rng.uniform(-0.15, 0.15, pts.shape) * (ax, ay)
        pts[:, 1] = np.minimum(pts[:, 1], cam.point(x, z, 0)[1])
        reg = _raster_polygon(pts, cv.h, cv.w)
        if reg is not None:
            ys, xs, m = reg
            yy, xx = np.mgrid[ys, xs]
            c1 = np.asarray(_pick(rng, ((255, 0, 200), (0, 255, 230), (180, 255, 0))), np.float32)
            c2 = np.asarray(_pick(rng, ((20, 20, 20), (255, 255, 255), (120, 0, 255))), np.float32)
            period = max(2, int(0.15 * s) + 1)
            if rng.random() < 0.5:  # checkerboard
                sel = ((yy // period + xx // period) % 2).astype(bool)
            else:  # diagonal stripes
                sel = ((yy + xx) // period % 2).astype(bool)
            colour = np.zeros((cv.h, cv.w, 3), np.float32)
            colour[ys, xs] = np.where(sel[..., None], c1, c2)
            cv.paint(reg, None, colour, fine=0.03, **a)
    else:
        raise ValueError(f'unknown anomaly kind {kind!r}; expected one of {ANOMALY_TYPES}')


# ------------------------------------------------------------------------------------------
# Scene
# ------------------------------------------------------------------------------------------

def _scene_items(cv: _Canvas, cam: _Camera, rng, road: tuple[float, float],
                 walks: tuple[float, float], num_anomalies: int
                 ) -> list[tuple[float, Callable[[], None]]]:
    """Objects standing on the ground as (distance, draw) pairs, drawn later far to near."""
    xl, xr = road
    wl, wr = walks
    items: list[tuple[float, Callable[[], None]]] = []

    def add(fn, x: float, z: float, *args, **kwargs) -> None:
        items.append((z, lambda: fn(cv, cam, rng, x, z, *args, **kwargs)))

    # Poles with signs, traffic lights or lamps at the kerbs.
    for _ in range(int(rng.integers(1, 6))):
        left = rng.random() < 0.5
        x = xl - rng.uniform(0.3, 0.8) if left else xr + rng.uniform(0.3, 0.8)
        add(_draw_pole, x, rng.uniform(5, 60))
    # Rows of trees in wide sidewalks.
    for side, inner, width in ((-1, xl, wl), (1, xr, wr)):
        if width > 1.5 and rng.random() < 0.5:
            for z in np.arange(rng.uniform(4, 12), 80, rng.uniform(8, 15)):
                add(_draw_tree, inner + side * width * 0.6, z)
    # Pedestrians on the sidewalks, sometimes crossing the road.
    for _ in range(int(rng.integers(0, 5))):
        if rng.random() < 0.15:
            x = rng.uniform(xl + 0.5, xr - 0.5)
        elif rng.random() < 0.5:
            x = xl - rng.uniform(0.3, max(0.4, wl - 0.3))
        else:
            x = xr + rng.uniform(0.3, max(0.4, wr - 0.3))
        add(_draw_person, x, rng.uniform(5.5, 35))
    # Vehicles in lanes (centres 1.75 m inside the lane boundaries), at least 9 m apart.
    lanes = list(np.arange(xr - 1.75, xl + 1.0, -3.5))
    for lx in lanes:
        taken: list[float] = []
        for _ in range(int(rng.integers(0, 3))):
            z = rng.uniform(7, 70)
            if any(abs(z - o) < 9 for o in taken):
                continue
            taken.append(z)
            r = rng.random()
            if r < 0.62:
                add(_draw_box_vehicle, lx + rng.uniform(-0.3, 0.3), z, CAR, rng.uniform(1.7, 1.95),
                    rng.uniform(1.4, 1.7), rng.uniform(4.0, 4.8),
                    _jitter(rng, _pick(rng, _VEHICLE), 15), cabin=True, windows='none',
                    facing_back=bool(lx > xl + 3.0 or rng.random() < 0.5))
            elif r < 0.75:
                add(_draw_box_vehicle, lx, z, TRUCK, 2.5, rng.uniform(3.0, 3.8), rng.uniform(6, 9),
                    _jitter(rng, _pick(rng, ((235, 235, 235), (60, 90, 150), (170, 170, 170))),
                            10), cabin=False, windows='doors')
            elif r < 0.85:
                add(_draw_box_vehicle, lx, z, BUS, 2.55, 3.1, 12.0,
                    _jitter(rng, _pick(rng, ((240, 200, 30), (200, 30, 30), (230, 230, 230),
                                             (40, 90, 170))), 10), cabin=False, windows='band')
            else:
                add(_draw_two_wheeler, lx + rng.uniform(-1.0, 1.0), z, bool(rng.random() < 0.5),
                    True)
    if lanes and rng.random() < 0.12:
        add(_draw_tram, lanes[len(lanes) // 2], rng.uniform(12, 40))
    # Cars parked along the kerbs.
    for inner, side in ((xl, 1), (xr, -1)):
        if rng.random() < 0.45:
            for z in np.arange(rng.uniform(6, 14), 60, rng.uniform(5.5, 7)):
                if rng.random() < 0.75:
                    add(_draw_box_vehicle, inner + side * 1.1, z, CAR, 1.8, rng.uniform(1.4, 1.65),
                        4.4, _jitter(rng, _pick(rng, _VEHICLE), 15), cabin=True, windows='none')
    # Bicycles and motorcycles on the sidewalks, some with riders.
    for _ in range(int(rng.integers(0, 3))):
        if rng.random() < 0.5:
            x = xl - rng.uniform(0.5, max(0.6, wl))
        else:
            x = xr + rng.uniform(0.5, max(0.6, wr))
        add(_draw_two_wheeler, x, rng.uniform(6, 30), bool(rng.random() < 0.3),
            bool(rng.random() < 0.3))
    for _ in range(num_anomalies):
        kind = _pick(rng, ANOMALY_TYPES)
        add(_draw_anomaly, rng.uniform(xl + 0.8, xr - 0.8), rng.uniform(6.5, 22), kind)
    return items


def render_demo_scene(rng: np.random.Generator, height: int = 128, width: int = 256,
                      num_anomalies: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Renders one synthetic street scene.

    Args:
        rng: Random generator; the scene is a pure function of its state.
        height: Image height in pixels (at least 64).
        width: Image width in pixels (at least 64).
        num_anomalies: Objects of no Cityscapes class to place on the road.

    Returns:
        ``(image, label, anomaly)``: RGB uint8 (H, W, 3); train ids uint8 (H, W) with 255 for
        void (ego vehicle) and for anomaly pixels; bool (H, W) mask of visible anomaly pixels.
    """
    cv = _Canvas(height, width, rng)
    cam = _Camera(height, width, horizon=height * rng.uniform(0.36, 0.46),
                  vanish_x=width * rng.uniform(0.4, 0.6))
    far = 220.0
    yy = np.arange(height, dtype=np.float32)[:, None, None]

    # Sky: vertical gradient towards a lighter horizon, with clouds.
    top = _jitter(rng, _pick(rng, ((70, 125, 200), (150, 155, 165), (110, 150, 205),
                                   (185, 170, 160))), 15)
    bottom = np.clip(top + rng.uniform(40, 70), 0, 255)
    t = np.clip(yy / max(cam.yh, 1.0), 0, 1)
    sky = np.broadcast_to(top * (1 - t) + bottom * t, (height, width, 3)).copy()
    clouds = np.clip(cv.smooth * 0.5 + rng.uniform(-0.3, 0.3), 0, 1)[..., None]
    sky = sky * (1 - 0.5 * clouds) + 240 * 0.5 * clouds
    cv.poly([(0, 0), (width, 0), (width, height), (0, height)], SKY, sky, fine=0.02)

    # Far skyline of buildings and trees across the horizon.
    xmax = (width - cam.vx) / cam.scale(far) + 5
    xmin = -cam.vx / cam.scale(far) - 5
    x = xmin
    while x < xmax:
        w = rng.uniform(8, 30)
        if rng.random() < 0.7:
            cv.poly(cam.billboard(x, x + w, far, 0, rng.uniform(6, 40)), BUILDING,
                    _jitter(rng, _pick(rng, _FACADES), 20) * 0.9, texture=cv.smooth, strength=0.05)
        else:
            c = cam.point(x + w / 2, far, 4)
            r = w / 2 * cam.scale(far)
            cv.poly(_ellipse_points(c[0], c[1], r, r * 0.8), VEGETATION, _green(rng),
                    texture=cv.blotch, strength=0.3)
        x += w

    # Ground: terrain everywhere below the horizon, then road and sidewalks on top.
    terrain = _jitter(rng, _pick(rng, ((120, 130, 70), (140, 120, 80), (100, 125, 60))), 12)
    cv.poly(cam.ground(-400, 400, cam.near * 0.4, far), TERRAIN, terrain, texture=cv.blotch,
            strength=0.2, fine=0.1)
    xl, xr = -rng.uniform(3.5, 9.0), rng.uniform(2.5, 6.0)
    asphalt = _jitter(rng, (88, 88, 94), 18)
    cv.poly(cam.ground(xl, xr, cam.near * 0.4, far), ROAD, asphalt, texture=cv.smooth,
            strength=0.06, fine=0.05)
    for _ in range(int(rng.integers(0, 3))):  # repaired patches
        z0 = rng.uniform(6, 30)
        px = rng.uniform(xl, xr - 1)
        cv.poly(cam.ground(px, px + rng.uniform(1, 3), z0, z0 + rng.uniform(2, 6)), ROAD,
                asphalt * rng.uniform(0.75, 0.9), texture=cv.smooth, strength=0.06)
    white = (225, 225, 220)
    for lx in np.arange(xr - 3.5, xl + 1.0, -3.5):
        phase = rng.uniform(0, 9)
        cv.polys([cam.ground(lx - 0.07, lx + 0.07, z0, z0 + 3.0)
                  for z0 in np.arange(cam.near * 0.5 + phase, 120, 9.0)], ROAD, white)
    if rng.random() < 0.5:
        for ex in (xl + 0.3, xr - 0.3):
            cv.poly(cam.ground(ex - 0.07, ex + 0.07, cam.near * 0.5, far), ROAD, white)
    if rng.random() < 0.25:  # zebra crossing
        z0 = rng.uniform(9, 25)
        cv.polys([cam.ground(bx, bx + 0.5, z0, z0 + 3.0)
                  for bx in np.arange(xl + 0.3, xr - 0.3, 1.0)], ROAD, white)

    walks = []
    for inner, side in ((xl, -1), (xr, 1)):
        width_m = rng.uniform(1.5, 4.0) if rng.random() < 0.9 else 0.0
        walks.append(width_m)
        if not width_m:
            continue
        outer = inner + side * width_m
        paving = _jitter(rng, _pick(rng, ((150, 150, 150), (175, 165, 150), (160, 120, 110))), 12)
        a, b = sorted((inner, outer))
        cv.poly(cam.ground(a, b, cam.near * 0.4, far), SIDEWALK, paving, texture=cv.blotch,
                strength=0.08, fine=0.07)
        # Paving joints (sub-pixel beyond 40 m).
        cv.polys([cam.ground(a, b, z0, z0 + 0.06) for z0 in np.arange(cam.near * 0.5, 40, 1.2)],
                 SIDEWALK, paving * 0.8)
        k0, k1 = sorted((inner, inner + side * 0.2))  # kerb stones
        cv.poly(cam.ground(k0, k1, cam.near * 0.4, far), SIDEWALK, paving * 1.12)

    # Facades along both sides, split in segments of buildings, walls, fences and greenery.
    for side, inner, walk in ((-1, xl, walks[0]), (1, xr, walks[1])):
        plane = inner + side * (walk + (rng.uniform(0.5, 4) if rng.random() < 0.4 else 0.0))
        bounds = [cam.near * 0.4]
        while bounds[-1] < 150:  # the far skyline covers what lies beyond
            bounds.append(bounds[-1] + rng.uniform(8, 30))
        segments = list(zip(bounds[:-1], bounds[1:]))
        for z0, z1 in reversed(segments):
            r = rng.random()
            if r < 0.62:
                _facade(cv, cam, rng, plane, z0, z1)
            elif r < 0.8:
                for z in np.arange(z1 - 3, z0, -rng.uniform(4, 8)):
                    _draw_tree(cv, cam, rng, plane + side * 2.0, z)
                cv.poly(cam.side(plane, z0, z1, 0, rng.uniform(0.8, 1.8)), VEGETATION, _green(rng),
                        texture=cv.blotch, strength=0.3, fine=0.08)
            elif r < 0.9:
                cv.poly(cam.side(plane, z0, z1, 0, rng.uniform(1.0, 2.5)), WALL,
                        _jitter(rng, (150, 145, 135), 20), texture=cv.smooth, strength=0.08,
                        fine=0.06)
            else:
                if rng.random() < 0.5:
                    _facade(cv, cam, rng, plane + side * 6, z0, z1)
                _fence(cv, cam, rng, inner + side * walk, z0, z1)

    items = _scene_items(cv, cam, rng, (xl, xr), (walks[0], walks[1]), num_anomalies)
    for _, draw in sorted(items, key=lambda it: -it[0]):
        draw()

    if rng.random() < 0.35:  # ego-vehicle bonnet: void in Cityscapes
        top_y = height * rng.uniform(0.9, 0.95)
        hood = np.array([(-0.1 * width, height + 1), (-0.1 * width, height * 0.98),
                         (0.25 * width, top_y), (0.75 * width, top_y),
                         (1.1 * width, height * 0.98), (1.1 * width, height + 1)])
        cv.poly(hood, IGNORE_INDEX, _jitter(rng, (40, 40, 45), 15), texture=cv.smooth,
                strength=0.1)

    # Camera: exposure, white balance, optics blur and sensor noise.
    img = cv.img * rng.uniform(0.8, 1.15) * (1 + rng.normal(0, 0.04, 3)).astype(np.float32)
    img = cv2.GaussianBlur(img, (3, 3), 0.6)
    img = img + rng.normal(0, rng.uniform(2, 6), img.shape).astype(np.float32)
    image = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    label = cv.lbl.copy()
    label[cv.anomaly] = IGNORE_INDEX
    return image, label, cv.anomaly.copy()


def _facade(cv: _Canvas, cam: _Camera, rng, plane: float, z0: float, z1: float) -> None:
    height = rng.uniform(7, 28)
    wall = _jitter(rng, _pick(rng, _FACADES), 15)
    cv.poly(cam.side(plane, z0, z1, 0, height), BUILDING, wall, texture=cv.smooth, strength=0.06,
            fine=0.05)
    glass = _jitter(rng, (55, 65, 85), 12)
    step = rng.uniform(2.5, 3.5)
    dark, lit = [], []
    for hh in np.arange(1.3, height - 1.5, 3.1):
        for zz in np.arange(z0 + 0.8, min(z1, 100.0) - 1.4, step):  # sub-pixel beyond 100 m
            (lit if rng.random() < 0.08 else dark).append(
                cam.side(plane, zz, zz + 1.2, hh, hh + 1.5))
    cv.polys(dark, BUILDING, glass)
    cv.polys(lit, BUILDING, (230, 210, 120))
    # A door or shop front on the ground floor now and then.
    if rng.random() < 0.5:
        zz = rng.uniform(z0, max(z0 + 0.1, z1 - 3))
        cv.poly(cam.side(plane, zz, zz + 2.5, 0, 2.6), BUILDING, wall * 0.55)


def _fence(cv: _Canvas, cam: _Camera, rng, plane: float, z0: float, z1: float) -> None:
    top = rng.uniform(1.0, 2.0)
    colour = _jitter(rng, _pick(rng, ((110, 80, 55), (90, 95, 100), (60, 100, 70))), 12)
    rails = [cam.side(plane, z0, z1, hh, hh + 0.08) for hh in (0.25, top - 0.1)]
    posts = [cam.side(plane, zz, zz + 0.07, 0, top)
             for zz in np.arange(z0, z1, rng.uniform(0.25, 0.6))]
    cv.polys(rails + posts, FENCE, colour)


# ------------------------------------------------------------------------------------------
# Data set on disk
# ------------------------------------------------------------------------------------------

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
    min_pixels = max(20, int(round(_MIN_ANOMALY_FRACTION * height * width)))
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
        seed: Base random seed (non-negative); frame i of a split depends only on the seed,
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
        if manifest is None or manifest.get('generator') != _GENERATOR:
            raise FileExistsError(
                f'{root} is not empty and holds no readable {_MANIFEST} written by '
                f'{_GENERATOR}; refusing to overwrite it. Pass another --out or remove it.')
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
