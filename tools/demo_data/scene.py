"""One demo street scene: ground, facades and skyline, objects far to near, camera effects."""
from __future__ import annotations

from typing import Callable

import cv2
import numpy as np

from .anomalies import draw_anomaly
from .drawing import (FACADES, VEHICLE_PAINTS, Camera, Canvas, ellipse_points, jitter, pick,
                      random_green)
from .labels import (ANOMALY_TYPES, BUILDING, BUS, CAR, IGNORE_INDEX, ROAD, SIDEWALK, SKY,
                     TERRAIN, TRUCK, VEGETATION, WALL)
from .objects import (draw_box_vehicle, draw_facade, draw_fence, draw_person, draw_pole,
                      draw_tram, draw_tree, draw_two_wheeler)

__all__ = ['render_demo_scene']


def scene_items(canvas: Canvas, cam: Camera, rng, road: tuple[float, float],
                walks: tuple[float, float], num_anomalies: int
                ) -> list[tuple[float, Callable[[], None]]]:
    """Objects standing on the ground as (distance, draw) pairs, drawn later far to near."""
    xl, xr = road
    wl, wr = walks
    items: list[tuple[float, Callable[[], None]]] = []

    def add(fn, x: float, z: float, *args, **kwargs) -> None:
        items.append((z, lambda: fn(canvas, cam, rng, x, z, *args, **kwargs)))

    # Poles with signs, traffic lights or lamps at the kerbs.
    for _ in range(int(rng.integers(1, 6))):
        left = rng.random() < 0.5
        x = xl - rng.uniform(0.3, 0.8) if left else xr + rng.uniform(0.3, 0.8)
        add(draw_pole, x, rng.uniform(5, 60))
    # Rows of trees in wide sidewalks.
    for side, inner, width in ((-1, xl, wl), (1, xr, wr)):
        if width > 1.5 and rng.random() < 0.5:
            for z in np.arange(rng.uniform(4, 12), 80, rng.uniform(8, 15)):
                add(draw_tree, inner + side * width * 0.6, z)
    # Pedestrians on the sidewalks, sometimes crossing the road.
    for _ in range(int(rng.integers(0, 5))):
        if rng.random() < 0.15:
            x = rng.uniform(xl + 0.5, xr - 0.5)
        elif rng.random() < 0.5:
            x = xl - rng.uniform(0.3, max(0.4, wl - 0.3))
        else:
            x = xr + rng.uniform(0.3, max(0.4, wr - 0.3))
        add(draw_person, x, rng.uniform(5.5, 35))
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
                add(draw_box_vehicle, lx + rng.uniform(-0.3, 0.3), z, CAR, rng.uniform(1.7, 1.95),
                    rng.uniform(1.4, 1.7), rng.uniform(4.0, 4.8),
                    jitter(rng, pick(rng, VEHICLE_PAINTS), 15), cabin=True, windows='none',
                    facing_back=bool(lx > xl + 3.0 or rng.random() < 0.5))
            elif r < 0.75:
                add(draw_box_vehicle, lx, z, TRUCK, 2.5, rng.uniform(3.0, 3.8), rng.uniform(6, 9),
                    jitter(rng, pick(rng, ((235, 235, 235), (60, 90, 150), (170, 170, 170))),
                           10), cabin=False, windows='doors')
            elif r < 0.85:
                add(draw_box_vehicle, lx, z, BUS, 2.55, 3.1, 12.0,
                    jitter(rng, pick(rng, ((240, 200, 30), (200, 30, 30), (230, 230, 230),
                                           (40, 90, 170))), 10), cabin=False, windows='band')
            else:
                add(draw_two_wheeler, lx + rng.uniform(-1.0, 1.0), z, bool(rng.random() < 0.5),
                    True)
    if lanes and rng.random() < 0.12:
        add(draw_tram, lanes[len(lanes) // 2], rng.uniform(12, 40))
    # Cars parked along the kerbs.
    for inner, side in ((xl, 1), (xr, -1)):
        if rng.random() < 0.45:
            for z in np.arange(rng.uniform(6, 14), 60, rng.uniform(5.5, 7)):
                if rng.random() < 0.75:
                    add(draw_box_vehicle, inner + side * 1.1, z, CAR, 1.8, rng.uniform(1.4, 1.65),
                        4.4, jitter(rng, pick(rng, VEHICLE_PAINTS), 15), cabin=True, windows='none')
    # Bicycles and motorcycles on the sidewalks, some with riders.
    for _ in range(int(rng.integers(0, 3))):
        if rng.random() < 0.5:
            x = xl - rng.uniform(0.5, max(0.6, wl))
        else:
            x = xr + rng.uniform(0.5, max(0.6, wr))
        add(draw_two_wheeler, x, rng.uniform(6, 30), bool(rng.random() < 0.3),
            bool(rng.random() < 0.3))
    for _ in range(num_anomalies):
        kind = pick(rng, ANOMALY_TYPES)
        add(draw_anomaly, rng.uniform(xl + 0.8, xr - 0.8), rng.uniform(6.5, 22), kind)
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
    canvas = Canvas(height, width, rng)
    cam = Camera(height, width, horizon=height * rng.uniform(0.36, 0.46),
                 vanish_x=width * rng.uniform(0.4, 0.6))
    far = 220.0
    yy = np.arange(height, dtype=np.float32)[:, None, None]

    # Sky: vertical gradient towards a lighter horizon, with clouds.
    top = jitter(rng, pick(rng, ((70, 125, 200), (150, 155, 165), (110, 150, 205),
                                 (185, 170, 160))), 15)
    bottom = np.clip(top + rng.uniform(40, 70), 0, 255)
    t = np.clip(yy / max(cam.yh, 1.0), 0, 1)
    sky = np.broadcast_to(top * (1 - t) + bottom * t, (height, width, 3)).copy()
    clouds = np.clip(canvas.smooth * 0.5 + rng.uniform(-0.3, 0.3), 0, 1)[..., None]
    sky = sky * (1 - 0.5 * clouds) + 240 * 0.5 * clouds
    canvas.poly([(0, 0), (width, 0), (width, height), (0, height)], SKY, sky, fine=0.02)

    # Far skyline of buildings and trees across the horizon.
    xmax = (width - cam.vx) / cam.scale(far) + 5
    xmin = -cam.vx / cam.scale(far) - 5
    x = xmin
    while x < xmax:
        w = rng.uniform(8, 30)
        if rng.random() < 0.7:
            canvas.poly(cam.billboard(x, x + w, far, 0, rng.uniform(6, 40)), BUILDING,
                        jitter(rng, pick(rng, FACADES), 20) * 0.9, texture=canvas.smooth,
                        strength=0.05)
        else:
            c = cam.point(x + w / 2, far, 4)
            r = w / 2 * cam.scale(far)
            canvas.poly(ellipse_points(c[0], c[1], r, r * 0.8), VEGETATION,
                        random_green(rng), texture=canvas.blotch, strength=0.3)
        x += w

    # Ground: terrain everywhere below the horizon, then road and sidewalks on top.
    terrain = jitter(rng, pick(rng, ((120, 130, 70), (140, 120, 80), (100, 125, 60))), 12)
    canvas.poly(cam.ground(-400, 400, cam.near * 0.4, far), TERRAIN, terrain, texture=canvas.blotch,
                strength=0.2, fine=0.1)
    xl, xr = -rng.uniform(3.5, 9.0), rng.uniform(2.5, 6.0)
    asphalt = jitter(rng, (88, 88, 94), 18)
    canvas.poly(cam.ground(xl, xr, cam.near * 0.4, far), ROAD, asphalt, texture=canvas.smooth,
                strength=0.06, fine=0.05)
    for _ in range(int(rng.integers(0, 3))):  # repaired patches
        z0 = rng.uniform(6, 30)
        px = rng.uniform(xl, xr - 1)
        canvas.poly(cam.ground(px, px + rng.uniform(1, 3), z0, z0 + rng.uniform(2, 6)), ROAD,
                    asphalt * rng.uniform(0.75, 0.9), texture=canvas.smooth, strength=0.06)
    white = (225, 225, 220)
    for lx in np.arange(xr - 3.5, xl + 1.0, -3.5):
        phase = rng.uniform(0, 9)
        canvas.polys([cam.ground(lx - 0.07, lx + 0.07, z0, z0 + 3.0)
                      for z0 in np.arange(cam.near * 0.5 + phase, 120, 9.0)], ROAD, white)
    if rng.random() < 0.5:
        for ex in (xl + 0.3, xr - 0.3):
            canvas.poly(cam.ground(ex - 0.07, ex + 0.07, cam.near * 0.5, far), ROAD, white)
    if rng.random() < 0.25:  # zebra crossing
        z0 = rng.uniform(9, 25)
        canvas.polys([cam.ground(bx, bx + 0.5, z0, z0 + 3.0)
                      for bx in np.arange(xl + 0.3, xr - 0.3, 1.0)], ROAD, white)

    walks = []
    for inner, side in ((xl, -1), (xr, 1)):
        width_m = rng.uniform(1.5, 4.0) if rng.random() < 0.9 else 0.0
        walks.append(width_m)
        if not width_m:
            continue
        outer = inner + side * width_m
        paving = jitter(rng, pick(rng, ((150, 150, 150), (175, 165, 150), (160, 120, 110))), 12)
        a, b = sorted((inner, outer))
        canvas.poly(cam.ground(a, b, cam.near * 0.4, far), SIDEWALK, paving, texture=canvas.blotch,
                    strength=0.08, fine=0.07)
        # Paving joints (sub-pixel beyond 40 m).
        canvas.polys([cam.ground(a, b, z0, z0 + 0.06) for z0 in np.arange(cam.near * 0.5, 40, 1.2)],
                     SIDEWALK, paving * 0.8)
        k0, k1 = sorted((inner, inner + side * 0.2))  # kerb stones
        canvas.poly(cam.ground(k0, k1, cam.near * 0.4, far), SIDEWALK, paving * 1.12)

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
                draw_facade(canvas, cam, rng, plane, z0, z1)
            elif r < 0.8:
                for z in np.arange(z1 - 3, z0, -rng.uniform(4, 8)):
                    draw_tree(canvas, cam, rng, plane + side * 2.0, z)
                canvas.poly(cam.side(plane, z0, z1, 0, rng.uniform(0.8, 1.8)), VEGETATION,
                            random_green(rng), texture=canvas.blotch, strength=0.3, fine=0.08)
            elif r < 0.9:
                canvas.poly(cam.side(plane, z0, z1, 0, rng.uniform(1.0, 2.5)), WALL,
                            jitter(rng, (150, 145, 135), 20), texture=canvas.smooth, strength=0.08,
                            fine=0.06)
            else:
                if rng.random() < 0.5:
                    draw_facade(canvas, cam, rng, plane + side * 6, z0, z1)
                draw_fence(canvas, cam, rng, inner + side * walk, z0, z1)

    items = scene_items(canvas, cam, rng, (xl, xr), (walks[0], walks[1]), num_anomalies)
    for _, draw in sorted(items, key=lambda it: -it[0]):
        draw()

    if rng.random() < 0.35:  # ego-vehicle bonnet: void in Cityscapes
        top_y = height * rng.uniform(0.9, 0.95)
        hood = np.array([(-0.1 * width, height + 1), (-0.1 * width, height * 0.98),
                         (0.25 * width, top_y), (0.75 * width, top_y),
                         (1.1 * width, height * 0.98), (1.1 * width, height + 1)])
        canvas.poly(hood, IGNORE_INDEX, jitter(rng, (40, 40, 45), 15), texture=canvas.smooth,
                    strength=0.1)

    # Camera: exposure, white balance, optics blur and sensor noise.
    img = canvas.img * rng.uniform(0.8, 1.15) * (1 + rng.normal(0, 0.04, 3)).astype(np.float32)
    img = cv2.GaussianBlur(img, (3, 3), 0.6)
    img = img + rng.normal(0, rng.uniform(2, 6), img.shape).astype(np.float32)
    image = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    label = canvas.lbl.copy()
    label[canvas.anomaly] = IGNORE_INDEX
    return image, label, canvas.anomaly.copy()

