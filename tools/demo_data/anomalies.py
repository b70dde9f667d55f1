"""Anomalies of the demo scenes: objects of no Cityscapes class, lying or standing on the road."""
from __future__ import annotations

import math

import numpy as np

from .drawing import Camera, Canvas, ellipse_points, jitter, pick, raster_polygon, segment_quad
from .labels import ANOMALY_TYPES, ROAD

__all__ = ['draw_anomaly']


def draw_anomaly(canvas: Canvas, cam: Camera, rng, x: float, z: float, kind: str) -> None:
    """Paints one anomaly of ``kind`` on the road, with its shadow, into the anomaly mask.

    The shadow is road (train id 0); the object itself keeps the label below it and is marked
    in ``canvas.anomaly`` (its label becomes 255 when the scene is finished).

    Args:
        canvas: Canvas of the frame.
        cam: Camera of the frame.
        rng: Random generator of the frame.
        x: Lateral position in metres (0 on the camera axis).
        z: Distance in metres.
        kind: One of :data:`ANOMALY_TYPES`.

    Raises:
        ValueError: ``kind`` is not one of :data:`ANOMALY_TYPES`.
    """
    s = cam.scale(z)
    shadow = cam.project([(x - 0.7, z - 0.3, 0), (x + 0.7, z - 0.3, 0), (x + 0.7, z + 0.6, 0),
                          (x - 0.7, z + 0.6, 0)])
    canvas.poly(shadow, ROAD, (45, 45, 48), fine=0.05)
    as_anomaly = dict(anomaly=True)
    if kind == 'animal':
        coat = jitter(rng, pick(rng, ((120, 75, 40), (30, 25, 22), (235, 230, 220),
                                      (150, 140, 130), (200, 120, 50))), 12)
        length, body_h = rng.uniform(0.9, 1.8), rng.uniform(0.45, 0.8)
        leg = rng.uniform(0.45, 0.8)
        facing = rng.choice([-1.0, 1.0])
        for lx in (-0.38, -0.25, 0.25, 0.38):
            canvas.poly(cam.line((x + lx * length, z, leg + 0.1), (x + lx * length * 1.05, z, 0.0),
                                 0.09), None, coat * 0.8, **as_anomaly)
        c = cam.point(x, z, leg + body_h / 2)
        canvas.poly(ellipse_points(c[0], c[1], length / 2 * s, body_h / 2 * s), None, coat,
                    texture=canvas.blotch, strength=0.15, **as_anomaly)
        if rng.random() < 0.5:  # spotted coat
            for _ in range(4):
                p = c + rng.uniform(-0.3, 0.3, 2) * (length * s, body_h * s)
                canvas.poly(ellipse_points(p[0], p[1], 0.12 * s, 0.09 * s, rng.uniform(0, 3)), None,
                            (20, 18, 16), **as_anomaly)
        neck = cam.point(x + facing * length * 0.45, z, leg + body_h * 0.7)
        head = cam.point(x + facing * length * 0.62, z, leg + body_h * 1.05)
        canvas.poly(segment_quad(neck, head, 0.2 * s), None, coat, **as_anomaly)
        canvas.poly(ellipse_points(head[0], head[1], 0.17 * s, 0.12 * s), None, coat * 0.9,
                    **as_anomaly)
        ear = cam.point(x + facing * length * 0.58, z, leg + body_h * 1.25)
        canvas.poly(segment_quad(head, ear, 0.07 * s), None, coat * 0.7, **as_anomaly)
        tail = cam.point(x - facing * length * 0.65, z, leg + body_h * 0.2)
        canvas.poly(segment_quad(cam.point(x - facing * length * 0.48, z, leg + body_h * 0.7), tail,
                                 0.05 * s), None, coat * 0.7, **as_anomaly)
    elif kind == 'box':
        w, h, d = rng.uniform(0.4, 1.0), rng.uniform(0.3, 0.8), rng.uniform(0.4, 0.9)
        card = jitter(rng, (190, 145, 90), 15)
        canvas.poly(cam.project([(x - w / 2, z, h), (x + w / 2, z, h), (x + w / 2, z + d, h),
                                 (x - w / 2, z + d, h)]), None, card * 1.15, **as_anomaly)
        side_x = x + w / 2 if x + w / 2 < 0 else (x - w / 2 if x - w / 2 > 0 else None)
        if side_x is not None:  # the side facing the camera axis
            canvas.poly(cam.side(side_x, z, z + d, 0, h), None, card * 0.8, **as_anomaly)
        canvas.poly(cam.billboard(x - w / 2, x + w / 2, z, 0, h), None, card, texture=canvas.smooth,
                    strength=0.05, **as_anomaly)
        canvas.poly(cam.billboard(x - w / 2, x + w / 2, z, h * 0.45, h * 0.55), None,
                    (215, 200, 160), **as_anomaly)
    elif kind == 'cone':
        h = rng.uniform(0.5, 0.9)
        orange = jitter(rng, (250, 110, 20), 8)
        canvas.poly(cam.billboard(x - 0.22, x + 0.22, z, 0, 0.05), None, (30, 30, 30), **as_anomaly)
        canvas.poly(cam.project([(x - 0.17, z, 0.05), (x + 0.17, z, 0.05), (x + 0.03, z, h),
                                 (x - 0.03, z, h)]), None, orange, **as_anomaly)
        canvas.poly(cam.project([(x - 0.11, z, 0.4 * h), (x + 0.11, z, 0.4 * h),
                                 (x + 0.08, z, 0.58 * h), (x - 0.08, z, 0.58 * h)]), None,
                    (245, 245, 245), **as_anomaly)
    elif kind == 'tyre':
        r = rng.uniform(0.3, 0.45)
        outer = cam.front_circle(x, z, r, r)
        canvas.poly(outer, None, (28, 28, 30), texture=canvas.blotch, strength=0.1, **as_anomaly)
        canvas.poly(cam.front_circle(x, z, r, r * 0.55), None, (150, 150, 160), **as_anomaly)
        canvas.poly(cam.front_circle(x, z, r, r * 0.2), None, (60, 60, 60), **as_anomaly)
    elif kind == 'rock':
        n = int(rng.integers(6, 10))
        ang = np.sort(rng.uniform(0, 2 * np.pi, n))
        rad = rng.uniform(0.25, 0.6) * rng.uniform(0.7, 1.2, n)
        c = cam.point(x, z, rad.mean() * 0.8)
        pts = np.stack([c[0] + rad * np.cos(ang) * s, c[1] + 0.8 * rad * np.sin(ang) * s], 1)
        pts[:, 1] = np.minimum(pts[:, 1], cam.point(x, z, 0)[1])
        canvas.poly(pts, None, jitter(rng, (125, 110, 95), 20), texture=canvas.blotch,
                    strength=0.25, fine=0.1, **as_anomaly)
    elif kind == 'plank':
        length, ang = rng.uniform(1.2, 2.4), rng.uniform(-0.6, 0.6)
        dx, dz = math.cos(ang) * length / 2, math.sin(ang) * length / 2
        wood = jitter(rng, (160, 110, 60), 15)
        top = cam.project([(x - dx - 0.1, z - dz, 0.08), (x + dx - 0.1, z + dz, 0.08),
                           (x + dx + 0.1, z + dz, 0.08), (x - dx + 0.1, z - dz, 0.08)])
        front = cam.project([(x - dx - 0.1, z - dz, 0.0), (x + dx - 0.1, z + dz, 0.0),
                             (x + dx - 0.1, z + dz, 0.08), (x - dx - 0.1, z - dz, 0.08)])
        canvas.poly(front, None, wood * 0.7, **as_anomaly)
        canvas.poly(top, None, wood, texture=canvas.smooth, strength=0.1, **as_anomaly)
    elif kind == 'odd_blob':
        c = cam.point(x, z, rng.uniform(0.3, 0.6))
        ax, ay = rng.uniform(0.35, 0.8) * s, rng.uniform(0.3, 0.6) * s
        pts = ellipse_points(c[0], c[1], ax, ay, rng.uniform(-0.4, 0.4), 16)
        pts += rng.uniform(-0.15, 0.15, pts.shape) * (ax, ay)
        pts[:, 1] = np.minimum(pts[:, 1], cam.point(x, z, 0)[1])
        reg = raster_polygon(pts, canvas.h, canvas.w)
        if reg is not None:
            ys, xs, m = reg
            yy, xx = np.mgrid[ys, xs]
            c1 = np.asarray(pick(rng, ((255, 0, 200), (0, 255, 230), (180, 255, 0))), np.float32)
            c2 = np.asarray(pick(rng, ((20, 20, 20), (255, 255, 255), (120, 0, 255))), np.float32)
            period = max(2, int(0.15 * s) + 1)
            if rng.random() < 0.5:  # checkerboard
                sel = ((yy // period + xx // period) % 2).astype(bool)
            else:  # diagonal stripes
                sel = ((yy + xx) // period % 2).astype(bool)
            colour = np.zeros((canvas.h, canvas.w, 3), np.float32)
            colour[ys, xs] = np.where(sel[..., None], c1, c2)
            canvas.paint(reg, None, colour, fine=0.03, **as_anomaly)
    else:
        raise ValueError(f'unknown anomaly kind {kind!r}; expected one of {ANOMALY_TYPES}')

