"""The miniature world: procedural street scenes painted in named visual styles.

A scene (``segmentation.synthetic.street_scene(..., full=True)``: label map, depth, instance ids) is
painted by `render(scene, style, seed)` into an RGB image. The output depends only on (scene, style,
seed): numpy's PCG64 and float32 arithmetic.

Styles play the roles real data plays for DGInStyle:
  - ``source``: the "game look" (GTA's role): a flat, saturated per-class palette, mild fixed textures,
    no weather. Labelled.
  - ``PRIOR_STYLES`` (the web's role for SD's prior): a natural palette with per-instance colours
    (cars, clothes, facades), then weather and light: sunny, overcast, foggy, night (lit windows,
    lamps, traffic lights), rainy, snowy, dusk, autumn, desert, overexposed. Each has a `word` that
    captions and generation prompts use. Labels of these exist only for evaluation.
  - ``UNSEEN_STYLES`` (infrared, neon): nothing trains on them; they show the limits.

Class colours collide across styles on purpose (snow turns the road into the source sidewalk's
colour, the night sky is the source road's, fog greys everything out), so a segmenter that only
learned colours does not transfer; shapes, textures (windows, foliage, lane marks) and context do.
Textures are defined in units of the image height, so a scene painted at 2x size is the same
picture, sharper: diffusion training mixes both scales, as MRLF's tiled pass draws zoomed-in views.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ldm import cli
from ldm.atomic import atomic_file, write_text
from segmentation.labels import CLASS_NAMES, TRAIN_ID_SUFFIX, save_label
from segmentation.synthetic import (BICYCLE, BUILDING, BUS, CAR, FENCE, MOTORCYCLE, PERSON, POLE, RIDER, ROAD,
                                    SIDEWALK, SKY, TERRAIN, TRAFFIC_LIGHT, TRAFFIC_SIGN, TRAIN, TRUCK, VEGETATION,
                                    VOID, WALL, Layout, Scene, street_scene)

N = 20  # palette rows: the 19 classes, then void (255)
GROUND = (ROAD, SIDEWALK, TERRAIN)
VEHICLES = (CAR, TRUCK, BUS, TRAIN, MOTORCYCLE, BICYCLE)
PEOPLE = (PERSON, RIDER)


def _rgb(*c) -> np.ndarray:
    return np.asarray(c, dtype=np.float32) / 255.0


# The game look: one flat colour per class (the "source" palette).
SOURCE_PALETTE = {
    ROAD: _rgb(62, 62, 78), SIDEWALK: _rgb(214, 198, 176), BUILDING: _rgb(196, 112, 84), WALL: _rgb(158, 150, 190),
    FENCE: _rgb(150, 116, 62), POLE: _rgb(235, 235, 235), TRAFFIC_LIGHT: _rgb(250, 170, 30),
    TRAFFIC_SIGN: _rgb(240, 230, 0), VEGETATION: _rgb(34, 176, 64), TERRAIN: _rgb(176, 216, 96),
    SKY: _rgb(70, 150, 255), PERSON: _rgb(255, 84, 84), RIDER: _rgb(255, 0, 120), CAR: _rgb(16, 16, 200),
    TRUCK: _rgb(0, 70, 130), BUS: _rgb(0, 110, 150), TRAIN: _rgb(0, 90, 100), MOTORCYCLE: _rgb(70, 0, 230),
    BICYCLE: _rgb(150, 30, 70), VOID: _rgb(20, 20, 20),
}

# The natural look the weather styles start from; classes with a list draw one colour per instance.
NATURAL_PALETTE = {
    ROAD: _rgb(112, 110, 112), SIDEWALK: _rgb(160, 156, 150),
    BUILDING: [_rgb(184, 172, 150), _rgb(150, 92, 72), _rgb(122, 122, 128), _rgb(204, 194, 172), _rgb(168, 146, 112)],
    WALL: _rgb(168, 162, 150), FENCE: _rgb(128, 112, 88), POLE: _rgb(92, 92, 98), TRAFFIC_LIGHT: _rgb(38, 40, 40),
    TRAFFIC_SIGN: [_rgb(200, 40, 40), _rgb(40, 84, 196), _rgb(230, 200, 40)],
    VEGETATION: [_rgb(68, 112, 44), _rgb(52, 96, 40), _rgb(86, 124, 52)], TERRAIN: _rgb(122, 132, 78),
    SKY: _rgb(140, 186, 236),
    PERSON: [_rgb(40, 40, 50), _rgb(180, 40, 40), _rgb(40, 70, 150), _rgb(200, 190, 170), _rgb(90, 120, 60)],
    RIDER: [_rgb(30, 30, 30), _rgb(200, 120, 30), _rgb(60, 60, 140)],
    CAR: [_rgb(205, 205, 210), _rgb(30, 30, 34), _rgb(160, 22, 22), _rgb(24, 52, 140), _rgb(122, 126, 130),
          _rgb(232, 232, 232)],
    TRUCK: [_rgb(222, 222, 222), _rgb(62, 92, 140)], BUS: [_rgb(230, 180, 32), _rgb(200, 62, 40)],
    TRAIN: _rgb(198, 200, 208), MOTORCYCLE: _rgb(30, 30, 32), BICYCLE: _rgb(62, 62, 66), VOID: _rgb(84, 78, 72),
}


@dataclass(frozen=True)
class Style:
    """How a scene is painted. `word` names the style in captions and prompts."""

    name: str
    word: str
    role: str  # "source", "prior" or "unseen"
    palette: dict = field(default_factory=lambda: NATURAL_PALETTE, hash=False)
    overrides: dict = field(default_factory=dict, hash=False)  # class -> colour (or list) replacing the palette's
    jitter: float = 0.06  # per-instance brightness jitter
    texture: float = 1.0  # amplitude of the class textures
    sky_top: tuple | None = None  # sky gradient: colour at the top row (the palette's sky at the horizon)
    gain: float = 1.0
    gamma: float = 1.0
    saturation: float = 1.0
    tint: tuple = (1.0, 1.0, 1.0)
    fog: float = 0.0  # visibility in metres (0: none): colour -> fog_colour by 1 - exp(-depth / fog)
    fog_colour: tuple = (0.8, 0.8, 0.82)
    lights: float = 0.0  # strength of lit windows, lamps and traffic lights (night, dusk)
    rain: float = 0.0  # streak density
    snow: float = 0.0  # how white the ground and foliage get; also the flake density
    grain: float = 0.0  # per-pixel sensor noise (night, overexposure)


SOURCE = Style("source", "game", "source", palette=SOURCE_PALETTE, jitter=0.0, texture=0.35)

PRIOR_STYLES = (
    Style("sunny", "sunny", "prior", saturation=1.25, gain=1.08, gamma=0.95, sky_top=(0.25, 0.5, 0.95)),
    Style("overcast", "overcast", "prior", saturation=0.45, gain=0.95, sky_top=(0.74, 0.75, 0.77),
          overrides={SKY: _rgb(200, 202, 206)}),
    Style("fog", "foggy", "prior", saturation=0.7, fog=14.0, fog_colour=(0.78, 0.79, 0.8)),
    Style("night", "night", "prior", gain=0.16, saturation=0.6, tint=(0.85, 0.9, 1.25), lights=1.0, grain=0.01,
          sky_top=(0.02, 0.02, 0.06), overrides={SKY: _rgb(30, 34, 62)}),
    Style("rain", "rainy", "prior", gain=0.6, saturation=0.55, tint=(0.92, 0.96, 1.05), rain=1.0,
          sky_top=(0.42, 0.44, 0.48), overrides={SKY: _rgb(130, 134, 140), ROAD: _rgb(58, 58, 64)}),
    Style("snow", "snowy", "prior", saturation=0.6, snow=1.0, sky_top=(0.7, 0.72, 0.76),
          overrides={SKY: _rgb(214, 216, 222), ROAD: _rgb(212, 210, 214), SIDEWALK: _rgb(232, 232, 236),
                     TERRAIN: _rgb(240, 240, 244)}),
    Style("dusk", "dusk", "prior", gain=0.55, tint=(1.25, 0.85, 0.75), lights=0.5, sky_top=(0.25, 0.15, 0.35),
          overrides={SKY: _rgb(250, 150, 90)}),
    Style("autumn", "autumn", "prior", tint=(1.08, 1.0, 0.88),
          overrides={VEGETATION: [_rgb(200, 90, 30), _rgb(220, 160, 40), _rgb(160, 50, 30)],
                     TERRAIN: _rgb(150, 110, 60)}),
    Style("desert", "desert", "prior", gain=1.1, saturation=0.8, fog=90.0, fog_colour=(0.9, 0.82, 0.66),
          sky_top=(0.62, 0.72, 0.86),
          overrides={TERRAIN: _rgb(222, 190, 130), SIDEWALK: _rgb(210, 184, 140), VEGETATION: _rgb(120, 120, 60),
                     BUILDING: [_rgb(214, 176, 120), _rgb(196, 150, 100), _rgb(230, 206, 160)],
                     SKY: _rgb(226, 220, 196)}),
    Style("overexposed", "overexposed", "prior", gain=1.9, gamma=0.7, saturation=0.5, grain=0.03),
)

UNSEEN_STYLES = (
    # False-colour infrared: foliage glows white, the sky is black.
    Style("infrared", "infrared", "unseen", saturation=0.15, sky_top=(0.0, 0.0, 0.0),
          overrides={VEGETATION: _rgb(245, 240, 245), TERRAIN: _rgb(220, 215, 220), SKY: _rgb(20, 20, 24),
                     ROAD: _rgb(70, 70, 70), CAR: [_rgb(40, 40, 40), _rgb(150, 150, 150)]}),
    # Neon night: dark, magenta and cyan light.
    Style("neon", "neon", "unseen", gain=0.35, tint=(1.4, 0.5, 1.5), lights=1.0, saturation=1.6,
          sky_top=(0.05, 0.0, 0.1), overrides={SKY: _rgb(60, 0, 90), ROAD: _rgb(20, 90, 110)}),
)

STYLES = {s.name: s for s in (SOURCE, *PRIOR_STYLES, *UNSEEN_STYLES)}


def get_style(name: str) -> Style:
    if name not in STYLES:
        raise ValueError(f"unknown style {name!r}; known: {', '.join(STYLES)}")
    return STYLES[name]


# ----------------------------------------------------------------------------------------
# Noise and textures (coordinates in units of the image height)
# ----------------------------------------------------------------------------------------

def _value_noise(h: int, w: int, cell: float, rng: np.random.Generator) -> np.ndarray:
    """Smooth noise in [-1, 1] with features about `cell` pixels apart (bilinear value noise)."""
    cell = max(cell, 1.0)
    gh, gw = int(h / cell) + 2, int(w / cell) + 2
    grid = rng.uniform(-1.0, 1.0, (gh, gw)).astype(np.float32)
    y = (np.arange(h, dtype=np.float32) + 0.5) / cell
    x = (np.arange(w, dtype=np.float32) + 0.5) / cell
    y0, x0 = y.astype(np.int64), x.astype(np.int64)
    fy, fx = (y - y0)[:, None], (x - x0)[None, :]
    g00, g01 = grid[y0][:, x0], grid[y0][:, x0 + 1]
    g10, g11 = grid[y0 + 1][:, x0], grid[y0 + 1][:, x0 + 1]
    return (g00 * (1 - fx) + g01 * fx) * (1 - fy) + (g10 * (1 - fx) + g11 * fx) * fy


def _windows(h: int, w: int, instance: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A grid of window cells (bool), phase-shifted per building instance."""
    period = max(h / 12.0, 2.0)
    y = np.arange(h, dtype=np.float32)[:, None] / period
    x = np.arange(w, dtype=np.float32)[None, :] / period
    phase = rng.uniform(0, 1, int(instance.max()) + 1).astype(np.float32)[instance]
    return ((y + phase) % 1.0 < 0.5) & ((x + 2 * phase) % 1.0 < 0.55)


# ----------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------

def _instance_colours(seg: np.ndarray, instance: np.ndarray, palette: dict, jitter: float,
                      rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) base colours: the palette's, one draw per (instance, class) where it gives a list."""
    idx = np.where(seg == VOID, N - 1, seg).astype(np.int64)
    flat = np.stack([np.asarray(palette[c] if not isinstance(palette[c], list) else palette[c][0])
                     for c in (*range(19), VOID)])
    img = flat[idx]
    n_inst = int(instance.max()) + 1
    gains = (1.0 + jitter * rng.standard_normal(n_inst)).astype(np.float32)
    picks = rng.integers(0, 1 << 30, n_inst)
    for c, colours in palette.items():
        if isinstance(colours, list):
            m = seg == c
            if m.any():
                choice = np.asarray(colours)[picks[instance[m]] % len(colours)]
                img[m] = choice
    obj = instance > 0
    img[obj] *= gains[instance[obj]][:, None]
    return img


def render(scene: Scene, style: Style | str, seed: int | np.random.Generator = 0) -> np.ndarray:
    """Paint `scene` in `style`: (H, W, 3) uint8. Deterministic in (scene, style, seed)."""
    style = get_style(style) if isinstance(style, str) else style
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    seg, depth, inst = scene.seg, scene.depth, scene.instance
    H, W = seg.shape
    palette = {**style.palette, **style.overrides}
    img = _instance_colours(seg, inst, palette, style.jitter, rng)

    # Class textures: facades with windows, foliage, ground grain, a sky gradient.
    t = style.texture
    fine, coarse = _value_noise(H, W, H / 12, rng), _value_noise(H, W, H / 4, rng)
    win = _windows(H, W, inst, rng)
    m = seg == BUILDING
    img[m & win] *= 1.0 - 0.45 * t
    img[seg == VEGETATION] *= (1.0 + 0.35 * t * fine[seg == VEGETATION])[:, None]
    for c, a in ((ROAD, 0.08), (SIDEWALK, 0.1), (TERRAIN, 0.2), (WALL, 0.12), (FENCE, 0.15)):
        mc = seg == c
        img[mc] *= (1.0 + a * t * (fine[mc] + coarse[mc]))[:, None]
    sky = seg == SKY
    if style.sky_top is not None and sky.any():
        rows = np.arange(H, dtype=np.float32)[:, None].repeat(W, 1)[sky]
        horizon = max(float(rows.max()), 1.0)
        k = (1.0 - rows / horizon)[:, None] ** 1.5  # 1 at the top, 0 at the lowest sky row
        img[sky] = img[sky] * (1 - k) + np.asarray(style.sky_top, np.float32) * k
    if t > 0.5:
        img[sky] *= (1.0 + 0.05 * coarse[sky])[:, None]

    # Weather on the surfaces.
    if style.snow:
        up = (seg == VEGETATION) | (seg == BUILDING) | (seg == FENCE) | (seg == WALL)
        cover = np.clip(0.5 + 0.8 * coarse, 0, 1)[up] * style.snow * 0.7
        img[up] = img[up] * (1 - cover[:, None]) + 0.93 * cover[:, None]
    if style.rain:  # wet ground: darker with a sheen of the sky colour
        g = np.isin(seg, GROUND)
        img[g] = img[g] * 0.7 + 0.12 * np.clip(coarse[g], 0, 1)[:, None]

    # Light and colour.
    img = img * style.gain * np.asarray(style.tint, np.float32)
    grey = img.mean(axis=2, keepdims=True)
    img = grey + (img - grey) * style.saturation

    if style.lights:
        img = _lights(img, seg, inst, win, style.lights, rng)
    if style.fog:
        f = 1.0 - np.exp(-np.minimum(depth, 1e4) / style.fog)
        img = img * (1 - f[..., None]) + np.asarray(style.fog_colour, np.float32) * f[..., None]
    if style.rain:
        img = _streaks(img, style.rain, rng)
    if style.snow:
        flakes = rng.random((H, W)) < 0.005 * style.snow
        img[flakes] = 0.95
    img = np.clip(img, 0.0, 1.0) ** (1.0 / style.gamma)
    if style.grain:
        img = img + style.grain * rng.standard_normal(img.shape).astype(np.float32)
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _lights(img, seg, inst, win, strength, rng):
    """Lit windows, glowing traffic lights and a lamp glow at the top of each pole."""
    H, W = seg.shape
    lit = (seg == BUILDING) & win & (rng.random(int(inst.max()) + 1) < 0.5)[inst]
    img[lit] = img[lit] * (1 - strength) + strength * np.asarray((1.0, 0.85, 0.45), np.float32)
    glow = np.zeros((H, W), np.float32)
    ys, xs = np.mgrid[0:H, 0:W].astype(np.float32)
    radius = max(H / 16.0, 1.5)
    for i in np.unique(inst[seg == POLE]):
        rows, cols = np.nonzero((inst == i) & (seg == POLE))
        top = rows.argmin()
        glow += np.exp(-((ys - rows[top]) ** 2 + (xs - cols[top]) ** 2) / (2 * radius ** 2))
    tl = seg == TRAFFIC_LIGHT
    img[tl] = img[tl] * (1 - strength) + strength * np.asarray((1.0, 0.3, 0.2), np.float32)
    return img + strength * 0.9 * np.minimum(glow, 1.0)[..., None] * np.asarray((1.0, 0.8, 0.5), np.float32)


def _streaks(img, density, rng):
    """Rain: short, slanted, light streaks."""
    H, W = img.shape[:2]
    n = int(density * H * W / 90)
    length = max(int(H / 10), 2)
    y = rng.integers(0, H, n)
    x = rng.integers(0, W, n)
    for k in range(length):
        yy, xx = y + k, x + k // 3
        ok = (yy < H) & (xx < W)
        img[yy[ok], xx[ok]] = img[yy[ok], xx[ok]] * 0.55 + 0.35
    return img


# ----------------------------------------------------------------------------------------
# The world on disk, in the layouts the real-data tools read
# ----------------------------------------------------------------------------------------

# Evaluation scenes differ in content from the source, as Cityscapes does from GTA: a higher camera
# looking further down, narrower streets, more and bigger people and vehicles.
TARGET_LAYOUT = Layout(horizon=(0.3, 0.42), camera_height=(1.6, 2.2), road_width=(5.0, 10.0),
                       furniture_gap=(4.0, 15.0), pedestrians=4.5, traffic=4.5, riders=1.5, object_scale=1.15)

# Caption templates of the prior corpus; the first is the generation prompt of mrlf.prompts.
CAPTIONS = ("A city street scene with {classes}, in {word} weather.", "{classes}, {word}", "a {word} street",
            "{word} city street with {classes}")


@dataclass(frozen=True)
class WorldSpec:
    """Sizes of the world's datasets. Scenes are base x 2*base pixels; every other source and prior
    scene is painted at twice that size, so training crops show objects at two scales."""

    base: int = 64
    source: int = 2000  # labelled source-style scenes (GTA's role)
    prior: int = 4000  # captioned prior-style scenes (the web's role)
    eval: int = 100  # labelled scenes per evaluation style
    oracle: int = 1300  # labelled scenes in every style (the oracle segmenter's training set)
    styles: int = 200  # base x base crops per style for the style classifier (and a quarter as many to validate)
    seed: int = 0


def class_list(label: np.ndarray) -> str:
    """The names of the classes in `label`, ascending train id (captions' and prompts' {classes})."""
    return " ".join(CLASS_NAMES[c] for c in np.unique(label) if c < len(CLASS_NAMES))


def caption(label: np.ndarray, style: Style, rng: np.random.Generator) -> str:
    return str(rng.choice(CAPTIONS)).format(classes=class_list(label), word=style.word)


def _scene(spec: WorldSpec, part: str, i: int, layout: Layout, two_scales: bool):
    rng = np.random.default_rng([spec.seed, _PARTS.index(part), i])
    f = 2 if two_scales and i % 2 else 1
    return street_scene(spec.base * f, 2 * spec.base * f, rng, layout=layout, full=True), rng


_PARTS = ("source", "prior", "eval", "oracle", "styles", "gate")
CLASSIFIED = (SOURCE, *PRIOR_STYLES)  # what the style classifier tells apart


def _save_png(image: np.ndarray, path: Path) -> None:
    with atomic_file(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")


def write_source(root: Path, spec: WorldSpec) -> None:
    """GTA-like: ``images/NNNNNN.png`` + ``labels/NNNNNN_labelTrainIds.png``."""
    for sub in ("images", "labels"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(spec.source):
        label_path = root / "labels" / f"{i:06d}{TRAIN_ID_SUFFIX}"
        if label_path.exists():
            continue  # written last: the pair is complete
        sc, rng = _scene(spec, "source", i, Layout(), two_scales=True)
        _save_png(render(sc, SOURCE, rng), root / "images" / f"{i:06d}.png")
        save_label(sc.seg, label_path)


def write_prior(root: Path, spec: WorldSpec) -> None:
    """An image folder with captions, as diffusers' text-to-image fine-tuning reads it:
    ``images/NNNNNN.png`` and ``metadata.jsonl`` lines ``{"file_name": ..., "text": ..., "style": ...}``.
    Styles cycle through PRIOR_STYLES; half the scenes have the evaluation layout."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    meta = root / "metadata.jsonl"
    if meta.exists():
        return
    rows = []
    for i in range(spec.prior):
        style = PRIOR_STYLES[i % len(PRIOR_STYLES)]
        layout = TARGET_LAYOUT if (i // len(PRIOR_STYLES)) % 2 else Layout()
        sc, rng = _scene(spec, "prior", i, layout, two_scales=True)
        name = f"images/{i:06d}.png"
        if not (root / name).exists():
            _save_png(render(sc, style, rng), root / name)
        rows.append({"file_name": name, "text": caption(sc.seg, style, rng), "style": style.name})
    write_text(meta, "".join(json.dumps(r) + "\n" for r in rows))


def write_eval(root: Path, style: Style, spec: WorldSpec) -> None:
    """Cityscapes-like: ``leftImg8bit/val/world/*_leftImg8bit.png`` + ``gtFine/val/world/*_gtFine_labelTrainIds.png``;
    the same scenes (target layout) in every style."""
    img_dir, lab_dir = root / "leftImg8bit" / "val" / "world", root / "gtFine" / "val" / "world"
    img_dir.mkdir(parents=True, exist_ok=True)
    lab_dir.mkdir(parents=True, exist_ok=True)
    for i in range(spec.eval):
        label_path = lab_dir / f"world_{i:06d}_gtFine_labelTrainIds.png"
        if label_path.exists():
            continue
        sc, rng = _scene(spec, "eval", i, TARGET_LAYOUT, two_scales=False)
        _save_png(render(sc, style, np.random.default_rng([spec.seed, 7, i, list(STYLES).index(style.name)])),
                  img_dir / f"world_{i:06d}_leftImg8bit.png")
        save_label(sc.seg, label_path)


LABELLED_FILE = "dataset.jsonl"  # a labelled set's images with their styles, as a jsonl dataset file


def write_labelled(root: Path, styles, n: int, spec: WorldSpec, part: str = "oracle") -> None:
    """GTA-like, the given styles in turn, both layouts and scales: an oracle segmenter's training set
    (every style), or the gate's (the prior styles). Beside it, ``dataset.jsonl`` lists the same pairs
    as a jsonl dataset file (paths relative to it) with each image's ``style``, its caption word as
    ``weather`` (the field of the generation prompt's template) and its label's class list as ``text``."""
    for sub in ("images", "labels"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        label_path = root / "labels" / f"{i:06d}{TRAIN_ID_SUFFIX}"
        style = styles[i % len(styles)]
        if label_path.exists():
            seg = np.asarray(Image.open(label_path))
        else:
            layout = TARGET_LAYOUT if (i // len(styles)) % 2 else Layout()
            sc, rng = _scene(spec, part, i, layout, two_scales=True)
            _save_png(render(sc, style, rng), root / "images" / f"{i:06d}.png")
            save_label(sc.seg, label_path)
            seg = sc.seg
        rows.append({"image": f"images/{i:06d}.png", "conditioning_image": f"labels/{label_path.name}",
                     "text": class_list(seg), "style": style.name, "weather": style.word})
    write_text(root / LABELLED_FILE, "".join(json.dumps(r) + "\n" for r in rows))


def write_styles(root: Path, spec: WorldSpec) -> None:
    """The style classifier's data in the ImageFolder layout: ``train/<style>/*.png`` and
    ``val/<style>/*.png``, base x base crops of scenes at both scales and layouts."""
    n_val = max(spec.styles // 4, 1)
    for k, style in enumerate(CLASSIFIED):
        for split, n, offset in (("train", spec.styles, 0), ("val", n_val, spec.styles)):
            folder = root / split / style.name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(offset, offset + n):
                path = folder / f"{i:06d}.png"
                if path.exists():
                    continue
                j = i * len(CLASSIFIED) + k
                sc, rng = _scene(spec, "styles", j, TARGET_LAYOUT if j % 3 == 0 else Layout(), two_scales=True)
                img = render(sc, style, rng)
                y = int(rng.integers(0, img.shape[0] - spec.base + 1))
                x = int(rng.integers(0, img.shape[1] - spec.base + 1))
                _save_png(img[y:y + spec.base, x:x + spec.base], path)


def write_world(root: str | os.PathLike, spec: WorldSpec = WorldSpec()) -> Path:
    """source/, prior/, eval/<style>/ (every style), oracle/ and styles/; resumable (finished files are kept)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    info = root / "world.json"
    if info.exists():
        old = json.loads(info.read_text())
        if old != asdict(spec):
            raise ValueError(f"{root}: holds a world made with {old}, not {asdict(spec)}; use another folder")
    else:
        write_text(info, json.dumps(asdict(spec), indent=1) + "\n")
    write_source(root / "source", spec)
    write_prior(root / "prior", spec)
    for style in (*PRIOR_STYLES, *UNSEEN_STYLES, SOURCE):
        write_eval(root / "eval" / style.name, style, spec)
    write_labelled(root / "oracle", (SOURCE, *PRIOR_STYLES, *UNSEEN_STYLES), spec.oracle, spec)
    write_styles(root / "styles", spec)
    return root


def get_parser() -> argparse.ArgumentParser:
    p = cli.parser("python -m segmentation.world", """Render the miniature world's datasets (source, prior, evaluation).

example:
    python -m segmentation.world --out data/world""")
    p.add_argument("--out", required=True, help="output folder")
    d = WorldSpec()
    helps = {"base": "scene height in pixels (scenes are base x 2*base)", "source": "labelled source-style scenes",
             "prior": "captioned prior-style scenes", "eval": "labelled scenes per evaluation style",
             "oracle": "labelled scenes in every style (an oracle segmenter's training set)",
             "styles": "crops per style for the style classifier", "seed": "global seed"}
    for name in helps:
        p.add_argument(f"--{name}", type=cli.integer(8) if name == "base" else cli.non_negative_int,
                       default=getattr(d, name), help=helps[name])
    return p


def main(argv: list[str] | None = None) -> None:
    a = get_parser().parse_args(argv)
    write_world(a.out, WorldSpec(**{n: getattr(a, n) for n in ("base", "source", "prior", "eval", "oracle",
                                                                  "styles", "seed")}))
    print(a.out)


if __name__ == "__main__":
    sys.exit(cli.run_cli(main))
