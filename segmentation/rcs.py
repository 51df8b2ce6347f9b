"""Rare Class Sampling as DGInStyle uses it: class statistics, probabilities, crop placement.

- ``class_stats(folder)``: per-file pixel counts of the 19 classes for the label PNGs of a folder,
  cached as JSON inside the folder (``rcs_class_stats.json``) and refreshed per file when a file's
  size or mtime changes, or files appear / disappear.
- ``rcs_class_probs(totals, T)``: P(c) = softmax_c((1 - f_c) / T), f_c = n_c / sum(n), T = 0.01.
  Classes with n_c = 0 are left out. The order is ascending n_c (the original's order), ties by
  ascending class id, so it is stable.
- Eligible files of class c: pixel count of c **strictly greater** than ``min_pixels`` (3000).
- ``RareClassSampler``: seeded (class, file) draws (generation jobs and gen files built from them:
  ``mrlf/jobs.py``).
- ``place_crop``: a crop around a random pixel of the class, retried until it holds enough of it.

Random draws (numpy ``Generator``), in this order:
- ``RareClassSampler.sample``: ``rng.choice(classes, p=probs)`` then ``rng.integers(len(files))``.
- ``place_crop``: exactly one ``rng.integers`` per try. Faithful mode draws ``rng.integers(0, n - 1)``
  as the original's generation does: the exclusive upper bound means the last pixel (row-major order)
  can never be picked, and n <= 1 is an error. The default mode draws ``rng.integers(0, n)``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ldm import cli
from ldm.atomic import write_text

from .labels import CLASS_NAMES, IGNORE, NUM_CLASSES, TRAIN_ID_SUFFIX, LabelError, load_label

DEFAULT_PATTERN = "*" + TRAIN_ID_SUFFIX
CACHE_NAME = "rcs_class_stats.json"
CACHE_VERSION = 1
DEFAULT_TEMPERATURE = 0.01
DEFAULT_MIN_PIXELS = 3000
DEFAULT_CROP = 512


class RCSError(ValueError):
    """Rare-class sampling cannot proceed (absent class, label smaller than the crop, ...)."""


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------
@dataclass
class ClassStats:
    """Pixel counts of a label folder. ``files`` are paths relative to ``folder`` (POSIX, sorted);
    ``counts[i, c]`` is the number of pixels of class c in file i; ``void[i]`` the 255 pixels;
    ``shapes[i] = (H, W)``."""

    folder: Path
    files: list[str]
    counts: np.ndarray  # (F, 19) int64
    void: np.ndarray  # (F,) int64
    shapes: np.ndarray  # (F, 2) int64
    pattern: str = DEFAULT_PATTERN  # the file names counted

    def path(self, i: int) -> Path:
        return self.folder / self.files[i]

    def totals(self) -> np.ndarray:
        """n_c summed over all files, (19,) int64 (void not counted)."""
        return self.counts.sum(axis=0)

    def class_probs(self, temperature: float = DEFAULT_TEMPERATURE) -> tuple[np.ndarray, np.ndarray]:
        return rcs_class_probs(self.totals(), temperature)

    def eligible(self, c: int, min_pixels: int = DEFAULT_MIN_PIXELS, crop_size=None) -> np.ndarray:
        """Indices of files with more than ``min_pixels`` pixels of class c (strictly greater),
        and, if ``crop_size`` is given, at least that large."""
        ok = self.counts[:, c] > min_pixels
        if crop_size is not None:
            ch, cw = _crop_hw(crop_size)
            ok &= (self.shapes[:, 0] >= ch) & (self.shapes[:, 1] >= cw)
        return np.flatnonzero(ok)

    def eligible_files(self, c: int, min_pixels: int = DEFAULT_MIN_PIXELS, crop_size=None) -> list[str]:
        return [self.files[i] for i in self.eligible(c, min_pixels, crop_size)]

    def samples_with_class(self, min_pixels: int = 0) -> dict[int, list[tuple[str, int]]]:
        """{c: [(file, n), ...]} for files with n > min_pixels (the original's samples_with_class)."""
        return {c: [(self.files[i], int(self.counts[i, c])) for i in self.eligible(c, min_pixels)]
                for c in range(NUM_CLASSES) if (self.counts[:, c] > min_pixels).any()}


def _file_key(p: Path) -> tuple[int, int]:
    st = p.stat()
    return st.st_size, st.st_mtime_ns


def _count_file(path: str) -> dict:
    a = load_label(path)
    if a.ndim != 2:
        raise LabelError(f"{path}: expected a 2-D label, got shape {a.shape}")
    bc = np.bincount(a.ravel(), minlength=256)
    return {"counts": [int(v) for v in bc[:NUM_CLASSES]], "void": int(bc[IGNORE]),
            "height": int(a.shape[0]), "width": int(a.shape[1])}


def _read_cache(path: Path) -> dict[str, dict]:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION:
        return {}
    return {e["file"]: e for e in data.get("files", []) if isinstance(e, dict) and "file" in e}


def _write_cache(path: Path, entries: list[dict]) -> None:
    write_text(path, json.dumps({"version": CACHE_VERSION, "files": entries}, separators=(",", ":")))


def class_stats(folder: str | os.PathLike, pattern: str = DEFAULT_PATTERN, recursive: bool = False,
                cache: bool | str | os.PathLike = True, workers: int = 1) -> ClassStats:
    """Per-class pixel counts of the label PNGs of ``folder`` matching ``pattern`` (use ``"*.png"``
    for a folder of plain trainId PNGs). Labels are validated (``LabelError`` on bad values).

    ``cache``: True keeps ``folder/rcs_class_stats.json`` (skipped with a warning when the folder
    is read-only), a path keeps it there, False disables it. A cached entry is reused only when the
    file's relative path, size and mtime (ns) all match; other files are re-counted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"not a folder: {folder}")
    cache_path = None if cache is False else (folder / CACHE_NAME if cache is True else Path(cache))
    found = folder.rglob(pattern) if recursive else folder.glob(pattern)
    paths = sorted(p for p in found if p.is_file() and not p.name.startswith(".") and p != cache_path)
    rels = [p.relative_to(folder).as_posix() for p in paths]
    old = _read_cache(cache_path) if cache_path is not None else {}

    entries: list[dict | None] = []
    todo = []
    for i, (p, rel) in enumerate(zip(paths, rels)):
        size, mtime = _file_key(p)
        e = old.get(rel)
        if e is not None and e.get("size") == size and e.get("mtime_ns") == mtime:
            entries.append(e)
        else:
            entries.append({"file": rel, "size": size, "mtime_ns": mtime})
            todo.append(i)
    if todo:
        args = [str(paths[i]) for i in todo]
        if workers > 1 and len(args) > 1:
            with ProcessPoolExecutor(max_workers=workers) as ex:
                results = list(ex.map(_count_file, args, chunksize=16))
        else:
            results = [_count_file(a) for a in args]
        for i, r in zip(todo, results):
            entries[i].update(r)
    if cache_path is not None and (todo or set(old) != set(rels)):
        try:
            _write_cache(cache_path, entries)
        except OSError as e:
            if cache is not True:
                raise
            warnings.warn(f"RCS statistics not cached ({e}); pass cache=<path> for a read-only folder")

    n = len(entries)
    return ClassStats(
        folder=folder,
        files=rels,
        counts=np.array([e["counts"] for e in entries], dtype=np.int64).reshape(n, NUM_CLASSES),
        void=np.array([e["void"] for e in entries], dtype=np.int64).reshape(n),
        shapes=np.array([[e["height"], e["width"]] for e in entries], dtype=np.int64).reshape(n, 2),
        pattern=pattern,
    )


# --------------------------------------------------------------------------------------------
# Probabilities and sampling
# --------------------------------------------------------------------------------------------
def rcs_class_probs(totals, temperature: float = DEFAULT_TEMPERATURE) -> tuple[np.ndarray, np.ndarray]:
    """(classes, probs) with probs = softmax((1 - f_c) / T), f_c = n_c / sum n (float64).

    ``totals`` is a length-19 sequence of n_c or a {class: n_c} mapping. Classes with n_c = 0
    are dropped. Order: ascending n_c, ties by ascending class id (the original sorts by n_c)."""
    if isinstance(totals, dict):
        items = [(int(c), int(n)) for c, n in totals.items()]
    else:
        items = list(enumerate(int(n) for n in np.asarray(totals).ravel()))
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    items = sorted(((c, n) for c, n in items if n > 0), key=lambda cn: (cn[1], cn[0]))
    if not items:
        raise RCSError("no class has any pixel: cannot compute RCS probabilities")
    classes = np.array([c for c, _ in items], dtype=np.int64)
    n = np.array([v for _, v in items], dtype=np.float64)
    z = (1.0 - n / n.sum()) / temperature
    e = np.exp(z - z.max())
    return classes, e / e.sum()


class RareClassSampler:
    """Seeded draws of (class, file index): c ~ P restricted to classes with eligible files (the
    restricted P is renormalised; f_c still comes from all classes), then a uniform eligible file.
    """

    def __init__(self, stats: ClassStats, temperature: float = DEFAULT_TEMPERATURE,
                 min_pixels: int = DEFAULT_MIN_PIXELS, crop_size=None):
        self.stats = stats
        if not stats.files:
            raise RCSError(f"{stats.folder}: no file matches {stats.pattern!r}")
        classes, probs = stats.class_probs(temperature)
        self.files = {int(c): stats.eligible(int(c), min_pixels, crop_size) for c in classes}
        keep = np.array([self.files[int(c)].size > 0 for c in classes], dtype=bool)
        if not keep.any():
            raise RCSError(f"{stats.folder}: no class has a file with more than {min_pixels} pixels"
                           + ("" if crop_size is None else f" and size >= {crop_size}"))
        self.classes = classes[keep]
        self.probs = probs[keep] / probs[keep].sum()

    def sample(self, rng: np.random.Generator) -> tuple[int, int]:
        """One (class id, file index) pair: ``rng.choice(classes, p)`` then ``rng.integers(k)``."""
        _check_rng(rng)
        c = int(rng.choice(self.classes, p=self.probs))
        files = self.files[c]
        return c, int(files[rng.integers(len(files))])


# --------------------------------------------------------------------------------------------
# Crop placement
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Crop:
    """A crop box (x1, y1, x2, y2) (x2, y2 exclusive), the tries used, the class pixels inside it
    and whether it passed the ratio test (False: all tries failed and the last crop was kept)."""

    box: tuple[int, int, int, int]
    tries: int
    class_pixels: int
    accepted: bool

    def apply(self, array):
        """``array[..., y1:y2, x1:x2]`` (labels (H, W), images (H, W, C) need ``apply_hwc``)."""
        x1, y1, x2, y2 = self.box
        return array[..., y1:y2, x1:x2]

    def apply_hwc(self, array):
        x1, y1, x2, y2 = self.box
        return array[y1:y2, x1:x2]


def _crop_hw(crop_size) -> tuple[int, int]:
    if isinstance(crop_size, (int, np.integer)):
        ch = cw = int(crop_size)
    else:
        ch, cw = (int(v) for v in crop_size)
    if ch <= 0 or cw <= 0:
        raise ValueError(f"crop size must be positive, got {crop_size}")
    return ch, cw


def _check_rng(rng) -> None:
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator (np.random.default_rng(seed)), got {type(rng).__name__}")


def crop_origin(x: int, y: int, height: int, width: int, crop_size=DEFAULT_CROP) -> tuple[int, int]:
    """x1 = min(max(0, x - cw//2), W - cw), y1 likewise: centred on (x, y), clamped inside."""
    ch, cw = _crop_hw(crop_size)
    return min(max(0, x - cw // 2), width - cw), min(max(0, y - ch // 2), height - ch)


def place_crop(label: np.ndarray, c: int, rng: np.random.Generator, crop_size=DEFAULT_CROP,
               min_ratio: float = 0.01, max_tries: int = 10, faithful: bool = False,
               source: str = "label") -> Crop:
    """Crop box around a random pixel of class ``c`` (the RCS crop of DGInStyle's generation).

    Each try draws one pixel index (faithful: ``rng.integers(0, n - 1)``; default
    ``rng.integers(0, n)``) into the row-major ``np.nonzero(label == c)`` order, centres the crop
    on it (``crop_origin``) and accepts when the crop holds more than ``min_ratio * ch * cw``
    pixels of c. After ``max_tries`` failures the last crop is kept (``accepted=False``).
    ``crop_size`` is an int or (height, width)."""
    _check_rng(rng)
    label = np.asarray(label)
    if label.ndim != 2:
        raise RCSError(f"{source}: expected a 2-D label, got shape {label.shape}")
    if max_tries < 1:
        raise ValueError(f"max_tries must be >= 1, got {max_tries}")
    ch, cw = _crop_hw(crop_size)
    h, w = label.shape
    if h < ch or w < cw:
        raise RCSError(f"{source}: label {h}x{w} (HxW) is smaller than the crop {ch}x{cw}")
    ys, xs = np.nonzero(label == c)
    n = len(ys)
    if faithful and n <= 1:
        raise RCSError(f"{source}: class {c} has {n} pixel(s); faithful crop placement draws "
                       f"rng.integers(0, n - 1) and needs at least 2")
    if n == 0:
        raise RCSError(f"{source}: class {c} is absent, cannot centre a crop on it")
    high = n - 1 if faithful else n
    threshold = min_ratio * ch * cw
    for t in range(1, max_tries + 1):
        i = int(rng.integers(0, high))
        x1, y1 = crop_origin(int(xs[i]), int(ys[i]), h, w, (ch, cw))
        k = int(np.count_nonzero(label[y1:y1 + ch, x1:x1 + cw] == c))
        if k > threshold:
            return Crop((x1, y1, x1 + cw, y1 + ch), t, k, True)
    return Crop((x1, y1, x1 + cw, y1 + ch), max_tries, k, False)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def add_stats_arguments(p: argparse.ArgumentParser) -> None:
    """The label-folder arguments of the command lines built on `class_stats` (this module's
    ``stats``; ``python -m mrlf.jobs``); `stats_from_args` reads them."""
    p.add_argument("folder", help="label folder (trainId PNGs)")
    p.add_argument("--pattern", default=DEFAULT_PATTERN, help="label file name pattern")
    p.add_argument("--temperature", type=cli.positive, default=DEFAULT_TEMPERATURE,
                   help="RCS temperature T of softmax((1 - f_c) / T)")
    p.add_argument("--min-pixels", type=cli.non_negative_int, default=DEFAULT_MIN_PIXELS,
                   help="files eligible for class c: more than this many pixels of c")
    p.add_argument("--workers", type=cli.positive_int, default=1, help="processes counting pixels")
    p.add_argument("--cache", default=None, help=f"statistics cache file (default FOLDER/{CACHE_NAME})")
    p.add_argument("--no-cache", action="store_true", help="do not read or write a cache")


def stats_from_args(args: argparse.Namespace) -> ClassStats:
    cache = False if args.no_cache else (args.cache or True)
    return class_stats(args.folder, pattern=args.pattern, cache=cache, workers=args.workers)


def get_parser() -> argparse.ArgumentParser:
    ap = cli.parser("python -m segmentation.rcs", "Rare class sampling tools (gen files of RCS-drawn jobs: "
                    "python -m mrlf.jobs).\n\nexample:\n    python -m segmentation.rcs stats data/gta/labels",
                    common=False)
    sub = ap.add_subparsers(dest="cmd", required=True)
    add_stats_arguments(cli.add_subcommand(sub, "stats", "class statistics and RCS probabilities of a label folder"))
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    stats = stats_from_args(args)
    classes, probs = stats.class_probs(args.temperature)
    tot = stats.totals()
    print(f"{len(stats.files)} files")
    print(f"{'id':>3} {'class':<14} {'pixels':>14} {'P(c)':>10} {'eligible':>9}")
    for c, p in zip(classes, probs):
        print(f"{c:>3} {CLASS_NAMES[c]:<14} {tot[c]:>14} {p:>10.4g} "
              f"{len(stats.eligible(int(c), args.min_pixels)):>9}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_cli(main))
