"""Procedural street-scene label maps (Cityscapes trainIds), for examples, tests and small experiments.

A pinhole camera at height ``hc`` looks down a straight street. Everything is placed
in metres on the ground plane (X to the right, Z forward, Y up) and projected with
``x = vx + f X / Z``, ``y = y_h + f (hc - Y) / Z``, so sizes shrink toward the
vanishing point ``(vx, y_h)`` as in a real dash-cam frame:
- sky above, ground below the horizon: road between two sidewalks, then a verge
  (sidewalk, terrain or vegetation) that changes lot by lot; an optional cross street;
- building lots on both sides (boxes of random length, depth and height, so the
  skyline steps), some replaced by walls, fences or gaps with trees, and an optional
  block closing the far end of the street;
- fences and hedges along the sidewalk edge;
- street furniture and traffic, painted far to near: poles (some with traffic signs,
  traffic lights or a lamp arm), trees, parked and moving cars, sometimes a truck, bus
  or tram (train), persons, riders on bicycles or motorcycles, parked bicycles;
- a few void (255) pixels: small "static" objects on the sidewalk and often the ego
  vehicle's bonnet at the bottom, as in Cityscapes.
Convex shapes are filled row span by row span inside their bounding box, so a 512x1024
map takes about 15 ms. ``street_scene(..., full=True)`` also returns the depth (metres along
the view axis; inf for the sky) and an instance id per pixel, which the styled renderer
(``segmentation.world``) uses for fog, lights and per-object colours; the ``Layout`` ranges
(camera, street width, object density and sizes) let evaluation sets differ in content from a
source set. The output depends only on the seed: numpy's PCG64 and float64
arithmetic, with no transcendental functions on pixel arrays (tree crowns use complex
powers instead of sin/atan2), so the maps should match bit for bit across machines.

The shipped examples (segmentation/examples/, 4 maps of 512x1024 whose union contains
all 19 classes) were written with:
    python -m segmentation.synthetic --out segmentation/examples --n 4 --seed 192
"""
from __future__ import annotations

import argparse
import functools
import math
import os
import sys
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ldm import cli

# Cityscapes trainIds (segmentation/labels.py holds names and palette; only the ids are needed here).
(ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE, TRAFFIC_LIGHT, TRAFFIC_SIGN, VEGETATION, TERRAIN, SKY,
 PERSON, RIDER, CAR, TRUCK, BUS, TRAIN, MOTORCYCLE, BICYCLE) = range(19)
VOID = 255


@dataclass(frozen=True)
class Layout:
    """Ranges of the random street layout. The defaults give the shipped examples; other values
    shift the content (a higher camera, narrower streets, denser or bigger objects)."""

    focal: tuple[float, float] = (0.55, 0.85)  # focal length / image width
    horizon: tuple[float, float] = (0.36, 0.5)  # horizon row / image height (camera pitch)
    camera_height: tuple[float, float] = (1.2, 1.7)  # metres
    road_width: tuple[float, float] = (6.5, 14.0)
    sidewalk_width: tuple[float, float] = (2.0, 5.0)
    furniture_gap: tuple[float, float] = (6.0, 22.0)  # metres between poles / trees on a sidewalk
    pedestrians: float = 3.0  # Poisson mean per side
    traffic: float = 3.0  # Poisson mean of moving vehicles
    riders: float = 1.0  # Poisson mean of ridden bicycles / motorcycles
    object_scale: float = 1.0  # size factor of persons, vehicles, poles and signs


@dataclass
class Scene:
    """A label map with the depth (metres; inf = sky) and the instance id of every pixel."""

    seg: np.ndarray  # (H, W) uint8 trainIds and 255
    depth: np.ndarray  # (H, W) float32
    instance: np.ndarray  # (H, W) int32; 0 = ground and sky, each object and lot its own id


def _rng(seed: np.random.Generator | int | None) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


class _Canvas:
    """A label map plus the camera, with fill primitives in pixel coordinates (x right, y down).

    Pixel (r, c) has its centre at (c + 0.5, r + 0.5); a shape covers the pixels whose
    centres fall inside it.
    """

    def __init__(self, height: int, width: int, f: float, vx: float, yh: float, hc: float):
        self.seg = np.full((height, width), SKY, dtype=np.uint8)
        self.depth = np.full((height, width), np.inf, dtype=np.float32)
        self.instance = np.zeros((height, width), dtype=np.int32)
        self.H, self.W, self.f, self.vx, self.yh, self.hc = height, width, f, vx, yh, hc
        self.z, self.id = np.inf, 0  # depth and instance of the object being painted

    def paint(self, z: float, draw: Callable[[], None]) -> None:
        """Run one object's draw() with its own instance id and depth."""
        self.z, self.id = float(z), self.id + 1
        draw()

    def _set(self, sl, cls, where=None, depth=None):
        """Write class, depth and instance into the window `sl` (where `where`)."""
        z = self.z if depth is None else depth
        if where is None:
            self.seg[sl], self.depth[sl], self.instance[sl] = cls, z, self.id
            return
        np.copyto(self.seg[sl], cls, where=where)
        np.copyto(self.depth[sl], np.broadcast_to(z, where.shape).astype(np.float32), where=where)
        np.copyto(self.instance[sl], self.id, where=where)

    # projection
    def project(self, X, Y, Z):
        Z = np.maximum(np.asarray(Z, dtype=np.float64), 1e-3)
        return self.vx + self.f * np.asarray(X) / Z, self.yh + self.f * (self.hc - np.asarray(Y)) / Z

    def _window(self, x0, x1, y0, y1):
        """Integer bounding box (clipped) and pixel-centre grids for a float box, or None."""
        c0, c1 = max(int(math.floor(x0)), 0), min(int(math.ceil(x1)), self.W)
        r0, r1 = max(int(math.floor(y0)), 0), min(int(math.ceil(y1)), self.H)
        if c0 >= c1 or r0 >= r1:
            return None
        xs = np.arange(c0, c1, dtype=np.float64)[None, :] + 0.5
        ys = np.arange(r0, r1, dtype=np.float64)[:, None] + 0.5
        return (slice(r0, r1), slice(c0, c1)), xs, ys

    def rect(self, x0, y0, x1, y1, cls, min_px: float = 1.0):
        """Axis-aligned rectangle, at least ``min_px`` wide and tall (thin far poles stay visible)."""
        if x1 - x0 < min_px:
            cx = 0.5 * (x0 + x1)
            x0, x1 = cx - 0.5 * min_px, cx + 0.5 * min_px
        if y1 - y0 < min_px:
            cy = 0.5 * (y0 + y1)
            y0, y1 = cy - 0.5 * min_px, cy + 0.5 * min_px
        c0, c1 = max(int(round(x0)), 0), min(int(round(x1)), self.W)
        r0, r1 = max(int(round(y0)), 0), min(int(round(y1)), self.H)
        if c0 < c1 and r0 < r1:
            self._set((slice(r0, r1), slice(c0, c1)), cls)

    def convex(self, pts: np.ndarray, cls, depth: Callable[[np.ndarray], np.ndarray] | None = None):
        """Fill the convex hull of points (k, 2) given as (x, y), row span by row span.

        depth(xs) gives the depth of the pixel columns xs (a box's side face); default: the object's.
        """
        hull = _convex_hull(pts)
        if len(hull) < 3:
            return
        win = self._window(hull[:, 0].min(), hull[:, 0].max(), hull[:, 1].min(), hull[:, 1].max())
        if win is None:
            return
        sl, xs, ys = win
        p, q = hull, np.roll(hull, -1, axis=0)
        p, q = p[p[:, 1] != q[:, 1]], q[p[:, 1] != q[:, 1]]  # horizontal edges add nothing
        y0, y1 = np.minimum(p[:, 1], q[:, 1]), np.maximum(p[:, 1], q[:, 1])
        t = (ys - p[:, 1]) / (q[:, 1] - p[:, 1])  # (rows, edges)
        x = p[:, 0] + t * (q[:, 0] - p[:, 0])
        crosses = (ys >= y0) & (ys <= y1)
        lo = np.where(crosses, x, np.inf).min(axis=1, keepdims=True)
        hi = np.where(crosses, x, -np.inf).max(axis=1, keepdims=True)
        self._set(sl, cls, (xs >= lo) & (xs <= hi), None if depth is None else depth(xs))

    def blob(self, cx, cy, rx, ry, cls, wobble=()):
        """Ellipse whose radius is modulated by ``1 + sum a sin(k theta + p)`` (tree crowns)."""
        amp = sum(abs(a) for a, _, _ in wobble)
        win = self._window(cx - rx * (1 + amp), cx + rx * (1 + amp), cy - ry * (1 + amp), cy + ry * (1 + amp))
        if win is None:
            return
        sl, xs, ys = win
        dx, dy = (xs - cx) / max(rx, 0.5), (ys - cy) / max(ry, 0.5)
        r = np.sqrt(dx * dx + dy * dy)
        inside = r <= 1.0 - amp
        band = ~inside & (r <= 1.0 + amp)  # only here does the wobble decide
        if band.any():
            rb = r[band]
            z = (np.broadcast_to(dx, r.shape)[band] + 1j * np.broadcast_to(dy, r.shape)[band]) / rb
            # sin(k theta + ph) = Im(z^k) cos ph + Re(z^k) sin ph with z = e^{i theta}: only
            # correctly rounded arithmetic, so the map is the same on every machine.
            lim, zk, k_done = 1.0, np.ones_like(z), 0
            for a, k, ph in sorted(wobble, key=lambda t: t[1]):
                for _ in range(k - k_done):
                    zk = zk * z
                k_done = k
                lim = lim + a * (zk.imag * math.cos(ph) + zk.real * math.sin(ph))
            inside[band] = rb <= lim
        self._set(sl, cls, inside)

    def box(self, X0, X1, Y0, Y1, Z0, Z1, cls):
        """A 3-D box on the street; its silhouette is the hull of its projected corners."""
        Z0 = max(Z0, 0.3)
        if Z1 <= Z0:
            return
        X, Y, Z = np.meshgrid([X0, X1], [Y0, Y1], [Z0, Z1], indexing="ij")
        x, y = self.project(X.ravel(), Y.ravel(), Z.ravel())
        near = 0.0 if X0 <= 0.0 <= X1 else min(abs(X0), abs(X1))  # the side face the camera sees

        def depth(xs):  # that face: x = vx + f X / Z, so Z = f X / (x - vx); the front face is Z0
            with np.errstate(divide="ignore", invalid="ignore"):
                z = self.f * near / np.abs(xs - self.vx)
            return np.clip(np.nan_to_num(z, nan=Z0, posinf=Z1), Z0, Z1).astype(np.float32)
        self.convex(np.stack([x, y], axis=1), cls, depth if near > 0 else None)


def _convex_hull(pts: np.ndarray) -> np.ndarray:
    """Andrew's monotone chain: the hull vertices in order (collinear points dropped)."""
    p = sorted(set(map(tuple, np.round(np.asarray(pts, dtype=np.float64), 9).tolist())))
    if len(p) < 3:
        return np.asarray(p)

    def half(points):
        out = []
        for q in points:
            while len(out) >= 2 and ((out[-1][0] - out[-2][0]) * (q[1] - out[-2][1])
                                     - (out[-1][1] - out[-2][1]) * (q[0] - out[-2][0])) <= 0:
                out.pop()
            out.append(q)
        return out

    lower, upper = half(p), half(p[::-1])
    return np.asarray(lower[:-1] + upper[:-1])


@dataclass
class _Lot:
    z0: float  # extent along the street (metres)
    z1: float
    kind: str  # building, gap, wall or fence
    verge: int  # ground class between the sidewalk and the lot
    setback: float  # facade distance behind the sidewalk
    height: float
    depth: float


@dataclass
class _Street:
    xl: float  # road edges (X, metres); the camera (X = 0) is on the road
    xr: float
    sl: float  # sidewalk widths
    sr: float
    cross: tuple[float, float] | None  # Z range of a cross street


def _ground(cv: _Canvas, st: _Street, verge: Callable[[np.ndarray, int], np.ndarray]):
    """Road, sidewalks and verges below the horizon (Z is constant along a row)."""
    r0 = max(int(math.floor(cv.yh + 0.5)), 0)
    if r0 >= cv.H:
        return
    rows = np.arange(r0, cv.H, dtype=np.float64) + 0.5
    Z = cv.f * cv.hc / np.maximum(rows - cv.yh, 1e-6)  # (R,)
    X = (np.arange(cv.W, dtype=np.float64)[None, :] + 0.5 - cv.vx) * (Z / cv.f)[:, None]  # (R, W)
    g = np.where(X < st.xl - st.sl, verge(Z, -1)[:, None], verge(Z, 1)[:, None]).astype(np.uint8)
    g[(X >= st.xl - st.sl) & (X <= st.xr + st.sr)] = SIDEWALK
    g[(X >= st.xl) & (X <= st.xr)] = ROAD
    if st.cross is not None:
        g[(Z >= st.cross[0]) & (Z <= st.cross[1])] = ROAD
    cv.seg[r0:] = g
    cv.depth[r0:] = Z.astype(np.float32)[:, None]


def street_scene(height: int = 512, width: int = 1024, seed: np.random.Generator | int | None = 0,
                 layout: Layout = Layout(), full: bool = False) -> np.ndarray | Scene:
    """One synthetic street-scene label map: (height, width) uint8 of trainIds and 255.

    `layout` sets the ranges of the random draws (the default gives the shipped examples);
    `full=True` returns a `Scene` with the depth and instance maps as well.
    """
    if height < 1 or width < 1:
        raise ValueError(f"size must be positive, got {height}x{width}")
    rng = _rng(seed)
    u = rng.uniform
    lay = layout
    H, W = height, width
    cv = _Canvas(H, W, f=u(*lay.focal) * W, vx=W * u(0.42, 0.58), yh=H * u(*lay.horizon), hc=u(*lay.camera_height))

    road = u(*lay.road_width)
    off = u(-0.35, 0.35) * (road - 2.5)  # camera somewhere on the carriageway
    st = _Street(xl=-road / 2 + off, xr=road / 2 + off, sl=u(*lay.sidewalk_width), sr=u(*lay.sidewalk_width),
                 cross=None)
    scale = lay.object_scale
    z_end = u(70.0, 220.0)
    if rng.random() < 0.4:
        z0 = u(12.0, 50.0)
        st.cross = (z0, z0 + u(9.0, 16.0))

    # Lots along each side, near to far, each with its own verge class.
    lots = {}
    for side in (-1, 1):
        z, items = u(-5.0, 2.0), []
        while z < z_end:
            length = u(6.0, 30.0)
            kind = str(rng.choice(["building", "gap", "wall", "fence"], p=[0.64, 0.18, 0.1, 0.08]))
            verge = int(rng.choice([SIDEWALK, TERRAIN, VEGETATION], p=[0.5, 0.3, 0.2]))
            height = u(5.0, 18.0) if rng.random() < 0.7 else u(18.0, 40.0)
            setback = u(0.0, 6.0) if verge != SIDEWALK else u(0.0, 1.0)  # front gardens are wider
            items.append(_Lot(z, z + length, kind, verge, setback, height, u(8.0, 25.0)))
            z += length
        lots[side] = items

    def verge(Z, side):
        items = lots[side]
        idx = np.minimum(np.searchsorted([it.z1 for it in items], Z), len(items) - 1)
        return np.array([it.verge for it in items], dtype=np.uint8)[idx]

    _ground(cv, st, verge)

    def edge(side):  # outer edge of the sidewalk
        return st.xl - st.sl if side < 0 else st.xr + st.sr

    def in_cross(z0, z1):
        return st.cross is not None and z1 > st.cross[0] and z0 < st.cross[1]

    # Far block closing the street, then lots far to near.
    if rng.random() < 0.6:
        cls = BUILDING if rng.random() < 0.75 else VEGETATION
        cv.paint(z_end, functools.partial(cv.box, -200.0, 200.0, 0.0, u(8.0, 40.0), z_end, z_end + 20.0, cls))
    planar, objects = [], []  # (depth, draw) pairs, painted far to near
    for side in (-1, 1):
        for lot in lots[side]:
            z0, z1 = lot.z0, lot.z1
            if in_cross(z0, z1):
                continue
            xf = edge(side) + side * lot.setback  # facade plane
            if lot.kind == "building":
                planar.append(_box(cv, xf, xf + side * lot.depth, 0.0, lot.height, z0, z1, BUILDING))
                if rng.random() < 0.25:  # fence or hedge in front of the building
                    xe = edge(side) + side * 0.2
                    cls, hf = (FENCE, u(0.8, 2.0)) if rng.random() < 0.6 else (VEGETATION, u(0.8, 1.6))
                    planar.append(_box(cv, xe - 0.05, xe + 0.05, 0.0, hf, z0 - 0.1, z1, cls))
            elif lot.kind in ("wall", "fence"):
                cls, hw = (WALL, u(1.5, 3.5)) if lot.kind == "wall" else (FENCE, u(1.0, 2.5))
                planar.append(_box(cv, xf - 0.15, xf + 0.15, 0.0, hw, z0, z1, cls))
                if rng.random() < 0.5:  # a building set further back behind it
                    xb = xf + side * u(6.0, 20.0)
                    planar.append(_box(cv, xb, xb + side * 15.0, 0.0, u(6.0, 25.0), z0, z1, BUILDING, depth=z1))
            if lot.kind != "building" or rng.random() < 0.15:  # trees in the lot
                for _ in range(rng.integers(1, 4)):
                    objects.append(_tree(cv, rng, edge(side) + side * u(0.5, 4.0), u(z0, z1)))
    for z, draw in sorted(planar, key=lambda t: -t[0]):
        cv.paint(z, draw)

    # Street furniture on both sidewalks.
    for side in (-1, 1):
        curb = st.xl if side < 0 else st.xr
        z = u(3.0, 20.0)
        while z < z_end * 0.8:
            if not in_cross(z - 1, z + 1):
                x = curb + side * u(0.3, 0.8)
                r = rng.random()
                if r < 0.45:
                    objects.append(_pole(cv, rng, x, z, side, scale))
                elif r < 0.7:
                    objects.append(_tree(cv, rng, x + side * u(0.3, 1.5), z))
                elif r < 0.8:
                    # small "static" object (bin, bollard, bike rack): void in Cityscapes
                    w = u(0.4, 1.0)
                    objects.append(_box(cv, x - w / 2, x + w / 2, 0.0, u(0.5, 1.2), z, z + w, VOID))
            z += u(*lay.furniture_gap)
        # pedestrians and parked bicycles
        for _ in range(rng.poisson(lay.pedestrians)):
            x, z = curb + side * u(0.5, st.sl if side < 0 else st.sr), u(4.0, 60.0)
            if rng.random() < 0.85:
                objects.append(_person(cv, rng, x, z, PERSON, scale=scale))
            else:
                objects.append(_two_wheeler(cv, rng, x, z, BICYCLE, rider=False, scale=scale))

    # Traffic: parked cars along both kerbs, moving vehicles in lanes, people crossing.
    for side in (-1, 1):
        if rng.random() < 0.65:
            xc = (st.xl + 1.1) if side < 0 else (st.xr - 1.1)
            z = u(5.0, 15.0)
            while z < 70.0:
                if rng.random() < 0.75 and not in_cross(z, z + 5):
                    objects.append(_car(cv, rng, xc, z, scale))
                z += u(4.8, 9.0)
    lanes = np.arange(st.xl + 1.8, st.xr - 1.7, 3.3)
    for _ in range(rng.poisson(lay.traffic)):
        xc, z = float(rng.choice(lanes)) + u(-0.4, 0.4), u(6.0, 90.0)
        r = rng.random()
        if r < 0.7:
            objects.append(_car(cv, rng, xc, z, scale))
        elif r < 0.85:
            objects.append(_truck(cv, rng, xc, z, scale))
        elif r < 0.95:
            objects.append(_box(cv, xc - 1.25 * scale, xc + 1.25 * scale, 0.0, 3.1 * scale, z, z + 12.0, BUS))
        else:  # a tram: "train" in Cityscapes
            objects.append(_box(cv, xc - 1.3 * scale, xc + 1.3 * scale, 0.1, 3.4 * scale, z, z + 28.0, TRAIN))
    for _ in range(rng.poisson(lay.riders)):
        xc, z = float(rng.choice(lanes)) + u(-0.5, 0.5), u(6.0, 50.0)
        kind = MOTORCYCLE if rng.random() < 0.4 else BICYCLE
        objects.append(_two_wheeler(cv, rng, xc, z, kind, rider=True, scale=scale))
    if rng.random() < 0.3:
        for _ in range(rng.integers(1, 4)):
            objects.append(_person(cv, rng, u(st.xl + 0.5, st.xr - 0.5), u(8.0, 25.0), PERSON, scale=scale))
    for z, draw in sorted(objects, key=lambda t: -t[0]):
        cv.paint(z, draw)

    if rng.random() < 0.6:  # ego vehicle's bonnet: void
        hh, cx = H * u(0.04, 0.12), W * u(0.45, 0.55)
        cv.paint(0.5, functools.partial(cv.blob, cx, H + hh * 0.6, W * u(0.55, 0.8), hh * 1.6, VOID))
    return Scene(cv.seg, cv.depth, cv.instance) if full else cv.seg


# ----------------------------------------------------------------------------------------
# Objects: each returns (depth, draw) so the caller can paint far to near. All random
# draws happen when the object is created, never inside draw().

def _box(cv: _Canvas, x0, x1, y0, y1, z0, z1, cls, depth: float | None = None):
    return (z0 if depth is None else depth), functools.partial(cv.box, min(x0, x1), max(x0, x1), y0, y1, z0, z1, cls)


def _tree(cv: _Canvas, rng: np.random.Generator, X: float, Z: float):
    u = rng.uniform
    trunk_h, crown_h, r = u(1.8, 3.5), u(3.5, 8.0), u(1.5, 3.8)
    wob = tuple((u(0.1, 0.3) / k, int(k), u(0, 2 * math.pi)) for k in rng.choice([2, 3, 4, 5, 6, 7], 3, replace=False))
    squash = u(0.8, 1.3)

    def draw():
        s = cv.f / Z
        x, yg = cv.project(X, 0.0, Z)
        cv.rect(x - 0.15 * s, yg - (trunk_h + 0.5) * s, x + 0.15 * s, yg, VEGETATION)
        cv.blob(x, yg - crown_h * s, r * s, r * squash * s, VEGETATION, wob)
    return Z, draw


def _pole(cv: _Canvas, rng: np.random.Generator, X: float, Z: float, side: int, scale: float = 1.0):
    u = rng.uniform
    h, w = u(4.0, 9.0), u(0.12, 0.3) * scale
    r = rng.random()
    extra = "light" if r < 0.25 else "sign" if r < 0.6 else "lamp" if r < 0.8 else None
    sign_h, sign_w, sign_shape = u(2.0, 3.2), u(0.5, 0.9) * scale, rng.integers(0, 3)
    light_y, arm = u(3.0, min(h, 6.0)), u(1.5, 4.0)
    hanging = rng.random() < 0.5

    def draw():
        s = cv.f / Z
        x, yg = cv.project(X, 0.0, Z)
        cv.rect(x - w * s / 2, yg - h * s, x + w * s / 2, yg, POLE)
        if extra == "sign":
            cy, half = yg - sign_h * s, sign_w * s / 2
            if sign_shape == 0:
                cv.blob(x, cy, half, half, TRAFFIC_SIGN)
            elif sign_shape == 1:
                cv.rect(x - half, cy - half, x + half, cy + half, TRAFFIC_SIGN)
            else:
                cv.convex(np.array([[x - half, cy + half], [x + half, cy + half], [x, cy - half]]), TRAFFIC_SIGN)
        elif extra == "light":  # on the pole, or hanging from an arm over the road
            if hanging:
                xa, ya = cv.project(X - side * arm, light_y, Z)
                cv.rect(min(x, xa), ya - 0.1 * s, max(x, xa), ya + 0.1 * s, POLE)
                cv.rect(xa - 0.2 * s, ya, xa + 0.2 * s, ya + 1.0 * s, TRAFFIC_LIGHT)
            else:
                cv.rect(x - 0.2 * s, yg - light_y * s - 1.0 * s, x + 0.2 * s, yg - light_y * s, TRAFFIC_LIGHT)
        elif extra == "lamp":
            xa, ya = cv.project(X - side * arm * 0.6, h - 0.2, Z)
            cv.rect(min(x, xa), ya - 0.08 * s, max(x, xa), ya + 0.08 * s, POLE)
    return Z, draw


def _car(cv: _Canvas, rng: np.random.Generator, X: float, Z: float, scale: float = 1.0):
    u = rng.uniform
    w, L, h = u(1.7, 2.0) * scale, u(3.9, 4.9) * scale, u(1.35, 1.7) * scale
    van = rng.random() < 0.15

    body, cabin, cabin_end = (0.95 * h, 1.3 * h, 0.95) if van else (0.58 * h, h, 0.8)

    def draw():  # body, then the narrower cabin on top
        cv.box(X - w / 2, X + w / 2, 0.0, body, Z, Z + L, CAR)
        cv.box(X - w / 2 + 0.12, X + w / 2 - 0.12, 0.0, cabin, Z + 0.28 * L, Z + cabin_end * L, CAR)
    return Z, draw


def _truck(cv: _Canvas, rng: np.random.Generator, X: float, Z: float, scale: float = 1.0):
    u = rng.uniform
    L, h = u(6.0, 10.0), u(2.8, 3.8) * scale

    def draw():
        cv.box(X - 1.2 * scale, X + 1.2 * scale, 0.0, h, Z + 2.3, Z + L, TRUCK)
        cv.box(X - 1.15 * scale, X + 1.15 * scale, 0.0, 2.7 * scale, Z, Z + 2.2, TRUCK)
    return Z, draw


def _person(cv: _Canvas, rng: np.random.Generator, X: float, Z: float, cls: int, base: float = 0.0,
            height: float | None = None, scale: float = 1.0):
    """A standing person; a rider (``base`` > 0: seat height) is drawn from the hips up."""
    hp = (height if height is not None else rng.uniform(1.5, 1.9)) * scale
    legs = rng.random() < 0.9 and base == 0.0

    def draw():
        s = cv.f / Z
        x, yg = cv.project(X, base, Z)
        H = hp * s
        cv.blob(x, yg - 0.62 * H, 0.14 * H, 0.22 * H, cls)  # torso
        cv.blob(x, yg - 0.91 * H, 0.075 * H, 0.085 * H, cls)  # head
        if legs:
            cv.rect(x - 0.1 * H, yg - 0.45 * H, x + 0.1 * H, yg, cls)
        else:
            cv.rect(x - 0.12 * H, yg - 0.45 * H, x + 0.12 * H, yg - 0.3 * H, cls)
    return Z, draw


def _two_wheeler(cv: _Canvas, rng: np.random.Generator, X: float, Z: float, cls: int, rider: bool,
                 scale: float = 1.0):
    heavy = cls == MOTORCYCLE
    w, h, L = ((0.8, 1.2, 2.0) if heavy else (0.5, 1.05, 1.8))
    w, h = w * scale, h * scale
    rider_draw = (_person(cv, rng, X, Z + L / 2, RIDER, base=(0.6 if heavy else 0.8) * scale, height=1.1 * scale)[1]
                  if rider else None)
    along = rng.random() < 0.7  # seen from behind/front (on the road) or from the side (parked)

    def draw():
        if along:  # wheels in line (a thin slab) and the handlebar across
            cv.box(X - w / 4, X + w / 4, 0.0, 0.75 * h, Z, Z + L, cls)
            cv.box(X - w / 2 - 0.1, X + w / 2 + 0.1, 0.9 * h, h, Z + 0.15 * L, Z + 0.25 * L, cls)
            cv.box(X - 0.05, X + 0.05, 0.0, h, Z + 0.15 * L, Z + 0.25 * L, cls)
        else:
            s = cv.f / (Z + 0.3)
            x, yg = cv.project(X, 0.0, Z + 0.3)
            r, half = 0.33 * s * scale, 0.55 * s * scale
            for dx in (-half, half):
                cv.blob(x + dx, yg - r, r, r, cls)
            cv.rect(x - half, yg - 2.2 * r, x + half, yg - r, cls)
        if rider_draw is not None:
            rider_draw()
    return Z, draw


# ----------------------------------------------------------------------------------------

def write_examples(out: str, n: int, seed: int = 0, height: int = 512, width: int = 1024) -> list[str]:
    """Write ``n`` maps as mode-L PNGs ``synthetic_{i:04d}_labelTrainIds.png``; map i uses seed ``[seed, i]``."""
    from PIL import Image

    os.makedirs(out, exist_ok=True)
    paths = []
    for i in range(n):
        seg = street_scene(height, width, np.random.default_rng([seed, i]))
        path = os.path.join(out, f"synthetic_{i:04d}_labelTrainIds.png")
        Image.fromarray(seg).save(path, optimize=True)
        paths.append(path)
    return paths


DESCRIPTION = "Write synthetic street-scene label maps (trainIds, mode L PNG)."


def get_parser() -> argparse.ArgumentParser:
    p = cli.parser("python -m segmentation.synthetic", f"{DESCRIPTION}\n\nexample:\n"
                   "    python -m segmentation.synthetic --out data/synthetic_labels --n 100 --height 512 --width 1024")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--n", type=cli.positive_int, default=4, help="number of maps")
    p.add_argument("--seed", type=cli.non_negative_int, default=0,
                   help="global seed; map i uses seed sequence [seed, i]")
    p.add_argument("--height", type=cli.integer(16), default=512, help="map height in pixels")
    p.add_argument("--width", type=cli.integer(16), default=1024, help="map width in pixels")
    return p


def main(argv: list[str] | None = None) -> None:
    a = get_parser().parse_args(argv)
    for path in write_examples(a.out, a.n, a.seed, a.height, a.width):
        print(path)


if __name__ == "__main__":
    sys.exit(cli.run_cli(main))
