"""Street objects of the demo scenes: people, two-wheelers, vehicles, poles, trees, facades.

Each ``draw_*`` function paints one object at a distance; the scene sorts them far to near.
"""
from __future__ import annotations

import numpy as np

from .drawing import (CLOTHES, FACADES, PANTS, SKIN, VEHICLE_PAINTS, Camera, Canvas,
                      ellipse_points, jitter, pick, random_green, segment_quad)
from .labels import (BICYCLE, BUILDING, FENCE, LIGHT, MOTORCYCLE, PERSON, POLE, RIDER, ROAD,
                     SIGN, TRAIN, VEGETATION)


def draw_person(canvas: Canvas, cam: Camera, rng, x: float, z: float, cls: int = PERSON,
                seated: float = 0.0) -> None:
    """A pedestrian (or, with ``seated`` metres of lift, a rider) seen from front or back."""
    hp = rng.uniform(1.55, 1.9)
    skin = jitter(rng, pick(rng, SKIN), 8)
    shirt = jitter(rng, pick(rng, CLOTHES))
    pants = jitter(rng, pick(rng, PANTS))
    k = hp / 1.75
    base = seated
    hip, shoulder = base + 0.88 * k, base + 1.45 * k
    if seated:
        # Legs go down to the pedals, slightly spread.
        for sx in (-1, 1):
            canvas.poly(cam.line((x + sx * 0.1, z, hip), (x + sx * 0.16, z, 0.35), 0.14), cls,
                        pants)
    else:
        spread = rng.uniform(0.0, 0.18)
        for sx in (-1, 1):
            canvas.poly(cam.line((x + sx * 0.09, z, hip), (x + sx * (0.09 + spread), z, 0.0),
                                 0.15 * k), cls, pants)
    canvas.poly(cam.billboard(x - 0.21 * k, x + 0.21 * k, z, hip - 0.05, shoulder), cls, shirt,
                texture=canvas.blotch, strength=0.08)
    for sx in (-1, 1):
        hand_x = x + sx * rng.uniform(0.22, 0.4) * k
        canvas.poly(cam.line((x + sx * 0.23 * k, z, shoulder - 0.05),
                             (hand_x, z, hip - rng.uniform(-0.1, 0.15)), 0.1 * k), cls, shirt)
    head_c = cam.point(x, z, shoulder + 0.16 * k)
    r = 0.12 * k * cam.scale(z)
    canvas.poly(ellipse_points(head_c[0], head_c[1], max(r, 0.6), max(1.15 * r, 0.7)), cls, skin)
    if rng.random() < 0.5 or seated:  # hair or helmet
        top = cam.point(x, z, shoulder + 0.21 * k)
        hair = (jitter(rng, (40, 30, 20), 20) if not seated
                else jitter(rng, pick(rng, CLOTHES)))
        canvas.poly(ellipse_points(top[0], top[1], max(1.05 * r, 0.6), max(0.75 * r, 0.5)), cls,
                    hair)


def draw_two_wheeler(canvas: Canvas, cam: Camera, rng, x: float, z: float, motor: bool,
                     rider: bool) -> None:
    """Bicycle or motorcycle in the plane X = x (riding along the road), optional rider."""
    cls = MOTORCYCLE if motor else BICYCLE
    r = 0.32 if motor else 0.34
    half = 0.7 if motor else 0.52
    tyre = (22, 22, 24)
    frame = jitter(rng, pick(rng, VEHICLE_PAINTS), 20)
    for dz in (-half, half):
        outer = cam.side_circle(x, z + dz, r, r)
        inner = cam.side_circle(x, z + dz, r, r * (0.45 if motor else 0.78))
        canvas.ring(outer, inner, cls, tyre)
        if motor:
            canvas.poly(inner, cls, (150, 150, 155))
    if motor:
        canvas.poly(cam.project([(x, z - half, r), (x, z - 0.2, 0.95), (x, z + 0.45, 1.0),
                                 (x, z + half, r), (x, z + 0.1, 0.35)]), cls, frame,
                    texture=canvas.smooth, strength=0.05)
        canvas.poly(cam.billboard(x - 0.35, x + 0.35, z + half - 0.1, 0.85, 1.05), cls,
                    (40, 40, 40))
    else:
        pts = [(x, z - half, r), (x, z - 0.05, r), (x, z - 0.15, r + 0.55), (x, z + 0.35, r + 0.5),
               (x, z + half, r)]
        for a, b in zip(pts[:-1], pts[1:]):
            canvas.poly(cam.line(a, b, 0.05), cls, frame)
        canvas.poly(cam.line(pts[1], pts[3], 0.05), cls, frame)
        canvas.poly(cam.line((x - 0.25, z + 0.35, r + 0.75), (x + 0.25, z + 0.35, r + 0.75), 0.05),
                    cls, (30, 30, 30))
    if rider:
        draw_person(canvas, cam, rng, x, z, cls=RIDER, seated=0.45 if motor else 0.35)


def draw_box_vehicle(canvas: Canvas, cam: Camera, rng, x: float, z: float, cls: int, width: float,
                     height: float, length: float, colour, *, cabin: bool, windows: str,
                     facing_back: bool = True) -> None:
    """A vehicle as a 3D box seen from behind (or the front) with its inner side visible."""
    body = np.asarray(colour, np.float32)
    glass = jitter(rng, (45, 55, 70), 10)
    dark = (20, 20, 22)
    half = width / 2
    side_x = x - half if x - half > 0 else (x + half if x + half < 0 else None)
    low = 0.55 * height if cabin else height
    # Side face (further away than the rear face, so painted first).
    if side_x is not None:
        shade = body * 0.82
        canvas.poly(cam.side(side_x, z, z + length, 0.25, low), cls, shade, texture=canvas.smooth,
                    strength=0.04)
        if cabin:
            canvas.poly(cam.project([(side_x, z + 0.2 * length, low),
                                     (side_x, z + 0.85 * length, low),
                                     (side_x, z + 0.7 * length, height),
                                     (side_x, z + 0.32 * length, height)]), cls, shade)
            canvas.poly(cam.project([(side_x, z + 0.26 * length, low + 0.05),
                                     (side_x, z + 0.8 * length, low + 0.05),
                                     (side_x, z + 0.68 * length, height - 0.08),
                                     (side_x, z + 0.35 * length, height - 0.08)]), None, glass)
        elif windows == 'band':
            canvas.poly(cam.side(side_x, z + 0.3, z + length - 0.3, 0.45 * height, 0.8 * height),
                        None, glass)
            for zz in np.arange(z + 1.5, z + length - 0.5, 1.8):
                canvas.poly(cam.side(side_x, zz, zz + 0.12, 0.45 * height, 0.8 * height), None,
                            body * 0.75)
        for zc in (z + 0.18 * length, z + 0.82 * length):
            rr = 0.33 if height < 2.2 else 0.5
            canvas.poly(cam.side_circle(side_x, zc, rr, rr), cls, dark)
            canvas.poly(cam.side_circle(side_x, zc, rr, rr * 0.5), cls, (130, 130, 135))
    # Rear (or front) face.
    for sx in (-1, 1):
        canvas.poly(cam.billboard(x + sx * (half - 0.05) - 0.14, x + sx * (half - 0.05) + 0.14,
                                  z + 0.3, 0.0, 0.35), cls, dark)
    canvas.poly(cam.billboard(x - half, x + half, z, 0.25, low), cls, body, texture=canvas.smooth,
                strength=0.05)
    if cabin:
        zc = z + 0.2 * length
        canvas.poly(cam.project([(x - half * 0.95, zc, low), (x + half * 0.95, zc, low),
                                 (x + half * 0.78, zc, height), (x - half * 0.78, zc, height)]),
                    cls, body * 0.95)
        canvas.poly(cam.project([(x - half * 0.8, zc, low + 0.06), (x + half * 0.8, zc, low + 0.06),
                                 (x + half * 0.68, zc, height - 0.07),
                                 (x - half * 0.68, zc, height - 0.07)]), None, glass)
    elif windows == 'band':
        canvas.poly(cam.billboard(x - half * 0.85, x + half * 0.85, z, 0.55 * height,
                                  0.85 * height), None, glass)
    elif windows == 'doors':
        canvas.poly(cam.line((x, z, 0.3), (x, z, height - 0.1), 0.04), None, body * 0.6)
    lamp = (230, 30, 30) if facing_back else (245, 240, 200)
    for sx in (-1, 1):
        canvas.poly(cam.billboard(x + sx * half * 0.92 - 0.12, x + sx * half * 0.92 + 0.12, z,
                                  0.45 * low + 0.15, 0.45 * low + 0.3), None, lamp)
    canvas.poly(cam.billboard(x - 0.25, x + 0.25, z, 0.35, 0.48), None, (235, 235, 225))


def draw_tram(canvas: Canvas, cam: Camera, rng, x: float, z: float) -> None:
    """A tram (class train) on its rails, with its pantograph."""
    colour = jitter(rng, pick(rng, ((230, 230, 225), (200, 40, 40), (235, 200, 40))), 10)
    # Rails are part of the road surface.
    for sx in (-0.72, 0.72):
        canvas.poly(cam.ground(x + sx - 0.04, x + sx + 0.04, max(z - 30, cam.near * 0.5), z + 40),
                    ROAD, (150, 150, 155))
    canvas.poly(cam.line((x - 0.6, z + 3, 3.45), (x, z + 3, 4.6), 0.05), TRAIN, (40, 40, 40))
    canvas.poly(cam.line((x + 0.6, z + 3, 3.45), (x, z + 3, 4.6), 0.05), TRAIN, (40, 40, 40))
    draw_box_vehicle(canvas, cam, rng, x, z, TRAIN, 2.4, 3.4, 28.0, colour, cabin=False,
                     windows='band')


def draw_pole(canvas: Canvas, cam: Camera, rng, x: float, z: float) -> None:
    """A pole carrying a traffic sign, a traffic light or a street lamp."""
    top = rng.uniform(3.5, 7.5)
    grey = jitter(rng, (110, 112, 115), 25)
    canvas.poly(cam.billboard(x - 0.07, x + 0.07, z, 0.0, top), POLE, grey)
    kind = rng.random()
    if kind < 0.45:  # traffic sign
        h = top - rng.uniform(0.3, 0.8)
        c = cam.point(x, z, h)
        r = 0.33 * cam.scale(z)
        shape = int(rng.integers(5))
        if shape == 0:  # prohibition: red rim, white disc
            canvas.poly(ellipse_points(c[0], c[1], r, r), SIGN, (200, 25, 30))
            canvas.poly(ellipse_points(c[0], c[1], 0.72 * r, 0.72 * r), SIGN, (240, 240, 240))
        elif shape == 1:  # mandatory: blue disc, white arrow
            canvas.poly(ellipse_points(c[0], c[1], r, r), SIGN, (30, 80, 190))
            canvas.poly(segment_quad((c[0], c[1] + 0.6 * r), (c[0], c[1] - 0.6 * r), 0.25 * r),
                        SIGN, (240, 240, 240))
        elif shape == 2:  # warning triangle
            tri = np.array([(c[0], c[1] - 1.1 * r), (c[0] + r, c[1] + 0.7 * r),
                            (c[0] - r, c[1] + 0.7 * r)])
            canvas.poly(tri, SIGN, (200, 25, 30))
            canvas.poly(c + (tri - c) * 0.62, SIGN, (245, 240, 235))
        elif shape == 3:  # direction board
            canvas.poly(cam.billboard(x - 0.5, x + 0.5, z, h - 0.3, h + 0.3), SIGN,
                        jitter(rng, pick(rng, ((30, 80, 190), (20, 120, 60), (240, 240, 240))), 8))
        else:  # stop
            canvas.poly(ellipse_points(c[0], c[1], r, r, np.pi / 8, 8), SIGN, (210, 20, 25))
    elif kind < 0.75:  # traffic light
        h = top - 0.1
        canvas.poly(cam.billboard(x - 0.18, x + 0.18, z, h - 0.95, h), LIGHT, (32, 32, 34))
        lit = int(rng.integers(3))
        for i, colour in enumerate(((240, 30, 20), (245, 190, 20), (30, 220, 90))):
            c = cam.point(x, z, h - 0.17 - 0.3 * i)
            r = 0.1 * cam.scale(z)
            canvas.poly(ellipse_points(c[0], c[1], r, r), LIGHT,
                        colour if i == lit else np.asarray(colour) * 0.25)
    else:  # street lamp
        canvas.poly(cam.line((x, z, top), (x + rng.choice([-1.2, 1.2]), z, top + 0.2), 0.1), POLE,
                    grey)


def draw_tree(canvas: Canvas, cam: Camera, rng, x: float, z: float) -> None:
    """A trunk and a crown of a few overlapping discs (all vegetation)."""
    trunk_h = rng.uniform(2.0, 3.5)
    canvas.poly(cam.billboard(x - 0.14, x + 0.14, z, 0.0, trunk_h + 0.5), VEGETATION,
                jitter(rng, (90, 65, 45), 12), texture=canvas.blotch, strength=0.1)
    green = random_green(rng)
    for _ in range(int(rng.integers(3, 6))):
        cx = x + rng.uniform(-1.0, 1.0)
        ch = trunk_h + rng.uniform(0.5, 2.0)
        c = cam.point(cx, z, ch)
        r = rng.uniform(1.0, 2.0) * cam.scale(z)
        canvas.poly(ellipse_points(c[0], c[1], r, r * rng.uniform(0.8, 1.1)), VEGETATION,
                    jitter(rng, green, 10), texture=canvas.blotch, strength=0.3, fine=0.08)



def draw_facade(canvas: Canvas, cam: Camera, rng, plane: float, z0: float, z1: float) -> None:
    """A building front in the plane X = plane from z0 to z1, with windows and maybe a door."""
    height = rng.uniform(7, 28)
    wall = jitter(rng, pick(rng, FACADES), 15)
    canvas.poly(cam.side(plane, z0, z1, 0, height), BUILDING, wall, texture=canvas.smooth,
                strength=0.06, fine=0.05)
    glass = jitter(rng, (55, 65, 85), 12)
    step = rng.uniform(2.5, 3.5)
    dark, lit = [], []
    for hh in np.arange(1.3, height - 1.5, 3.1):
        for zz in np.arange(z0 + 0.8, min(z1, 100.0) - 1.4, step):  # sub-pixel beyond 100 m
            (lit if rng.random() < 0.08 else dark).append(
                cam.side(plane, zz, zz + 1.2, hh, hh + 1.5))
    canvas.polys(dark, BUILDING, glass)
    canvas.polys(lit, BUILDING, (230, 210, 120))
    # A door or shop front on the ground floor now and then.
    if rng.random() < 0.5:
        zz = rng.uniform(z0, max(z0 + 0.1, z1 - 3))
        canvas.poly(cam.side(plane, zz, zz + 2.5, 0, 2.6), BUILDING, wall * 0.55)


def draw_fence(canvas: Canvas, cam: Camera, rng, plane: float, z0: float, z1: float) -> None:
    """Two rails and posts in the plane X = plane from z0 to z1."""
    top = rng.uniform(1.0, 2.0)
    colour = jitter(rng, pick(rng, ((110, 80, 55), (90, 95, 100), (60, 100, 70))), 12)
    rails = [cam.side(plane, z0, z1, hh, hh + 0.08) for hh in (0.25, top - 0.1)]
    posts = [cam.side(plane, zz, zz + 0.07, 0, top)
             for zz in np.arange(z0, z1, rng.uniform(0.25, 0.6))]
    canvas.polys(rails + posts, FENCE, colour)

