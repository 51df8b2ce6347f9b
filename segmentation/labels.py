"""Cityscapes train classes, palette, id -> trainId maps, label I/O, one-hot and colours.

Conventions (DGInStyle's ``training_classes.py``):
- a label map holds Cityscapes train ids 0..18 and ``IGNORE`` (255) for void;
- the ControlNet conditioning is a 20-channel one-hot map: channels 0..18 are the classes and
  channel ``VOID_CHANNEL`` (19) is void. The original ``make_one_hot`` wrote 19 into its input
  where 255 was, so its saved labels held 19; ``one_hot`` here never touches its input, so labels are
  saved as they came.

Raw ids -> trainIds (SegModel's ``tools/convert_datasets``): GTA and Cityscapes share the Cityscapes label ids, Mapillary Vistas
v1.2 has its own table; colour labels in the trainId colours map colour by colour. ``convert_folder``
writes ``*_labelTrainIds.png`` next to the raw files.

    python -m segmentation.labels convert --source gta data/gta/labels
    python -m segmentation.labels convert --source cityscapes --recursive data/cityscapes/gtFine
    python -m segmentation.labels convert --source color my_colour_labels/
    python -m segmentation.labels check data/gta/labels
"""
from __future__ import annotations

import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ldm import cli
from ldm.atomic import atomic_file

CLASS_NAMES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)
NUM_CLASSES = 19
IGNORE = 255
VOID_CHANNEL = 19
NUM_CHANNELS = NUM_CLASSES + 1  # one-hot channels: 19 classes + void

PALETTE = np.array(
    [[128, 64, 128], [244, 35, 232], [70, 70, 70], [102, 102, 156], [190, 153, 153],
     [153, 153, 153], [250, 170, 30], [220, 220, 0], [107, 142, 35], [152, 251, 152],
     [70, 130, 180], [220, 20, 60], [255, 0, 0], [0, 0, 142], [0, 0, 70], [0, 60, 100],
     [0, 80, 100], [0, 0, 230], [119, 11, 32]],
    dtype=np.uint8,
)
# 256-entry colour table: ids 0..18 get their colour, everything else (19, 255, ...) is black.
COLOR_LUT = np.zeros((256, 3), dtype=np.uint8)
COLOR_LUT[:NUM_CLASSES] = PALETTE

TRAIN_ID_SUFFIX = "_labelTrainIds.png"


class LabelError(ValueError):
    """A label map (or label file) with values, shape or format we cannot use."""


# --------------------------------------------------------------------------------------------
# Class names
# --------------------------------------------------------------------------------------------
_NAME_TO_ID = {name: i for i, name in enumerate(CLASS_NAMES)}


def class_name(train_id: int) -> str:
    """Name of train id 0..18 (``"traffic light"``, with a space)."""
    i = int(train_id)
    if not 0 <= i < NUM_CLASSES:
        raise KeyError(f"train id {train_id!r} is not a class (valid: 0..{NUM_CLASSES - 1})")
    return CLASS_NAMES[i]


def class_id(name: str | int) -> int:
    """Train id of a class name. Case-insensitive; ``_`` and ``-`` count as spaces; ints and digit
    strings pass through (checked to be 0..18)."""
    if isinstance(name, (int, np.integer)) or (isinstance(name, str) and name.strip().isdigit()):
        class_name(int(name))  # range check
        return int(name)
    key = " ".join(str(name).strip().lower().replace("_", " ").replace("-", " ").split())
    if key not in _NAME_TO_ID:
        raise KeyError(f"unknown class name {name!r}; known: {', '.join(CLASS_NAMES)}")
    return _NAME_TO_ID[key]


def class_names(ids: Iterable[int]) -> list[str]:
    return [class_name(i) for i in ids]


# --------------------------------------------------------------------------------------------
# Raw id -> trainId lookup tables (SegModel's tools/convert_datasets/{gta,cityscapes,mapillary}.py)
# --------------------------------------------------------------------------------------------
# Cityscapes label ids -> train ids; GTA5 labels use the Cityscapes label ids.
CITYSCAPES_TO_TRAIN: dict[int, int] = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
    25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}
GTA_TO_TRAIN: dict[int, int] = dict(CITYSCAPES_TO_TRAIN)
# Mapillary Vistas v1.2 ids -> train ids (SegModel tools/convert_datasets/mapillary.py).
MAPILLARY_TO_TRAIN: dict[int, int] = {
    13: 0, 24: 0, 41: 0,      # road, lane marking - general, manhole
    2: 1, 15: 1,              # curb, sidewalk
    17: 2, 6: 3, 3: 4,        # building, wall, fence
    45: 5, 47: 5,             # pole, utility pole
    48: 6, 50: 7, 30: 8, 29: 9, 27: 10, 19: 11,
    20: 12, 21: 12, 22: 12,   # bicyclist, motorcyclist, other rider
    55: 13, 61: 14, 54: 15, 58: 16, 57: 17, 52: 18,
}


def _make_lut(mapping: dict[int, int]) -> np.ndarray:
    lut = np.full(256, IGNORE, dtype=np.uint8)
    for raw, train in mapping.items():
        lut[raw] = train
    lut.flags.writeable = False
    return lut


LUTS: dict[str, np.ndarray] = {
    "gta": _make_lut(GTA_TO_TRAIN),
    "cityscapes": _make_lut(CITYSCAPES_TO_TRAIN),
    "mapillary": _make_lut(MAPILLARY_TO_TRAIN),
}
SOURCES = (*LUTS, "color")  # "color": colour labels in the trainId colours (Cityscapes' *_color.png too)


def colors_to_train_ids(rgb) -> np.ndarray:
    """(..., 3) uint8 colours -> train ids: each class's colour (`PALETTE`) gives its id, any other
    colour 255 (Cityscapes' non-train classes have colours of their own)."""
    a = np.asarray(rgb)
    if a.dtype != np.uint8 or a.shape[-1:] != (3,):
        raise LabelError(f"colour labels must be uint8 (..., 3), got {a.dtype} {a.shape}")
    code = (a[..., 0].astype(np.int32) << 16) | (a[..., 1].astype(np.int32) << 8) | a[..., 2]
    out = np.full(code.shape, IGNORE, np.uint8)
    for i, (r, g, b) in enumerate(PALETTE.astype(np.int32)):
        out[code == (r << 16 | g << 8 | b)] = i
    return out


def to_train_ids(array, source: str) -> np.ndarray:
    """Map raw label ids (0..255) of ``source`` ("gta", "cityscapes", "mapillary") to train ids, or
    the (..., 3) colours of a "color" label (`colors_to_train_ids`). Returns a new uint8 array;
    unmapped ids (colours) become 255."""
    if source not in SOURCES:
        raise ValueError(f"unknown label source {source!r}; expected one of {SOURCES}")
    if source == "color":
        return colors_to_train_ids(array)
    a = np.asarray(array)
    if a.dtype != np.uint8:
        if not np.issubdtype(a.dtype, np.integer):
            raise LabelError(f"raw label ids must be integers, got dtype {a.dtype}")
        if a.size and (a.min() < 0 or a.max() > 255):
            bad = np.unique(a[(a < 0) | (a > 255)])
            raise LabelError(f"raw label ids must be in 0..255, found {_fmt_values(bad)}")
        a = a.astype(np.uint8)
    return LUTS[source][a]


# --------------------------------------------------------------------------------------------
# Validation and I/O
# --------------------------------------------------------------------------------------------
def _fmt_values(values: Sequence[int], limit: int = 20) -> str:
    vals = [int(v) for v in values]
    s = ", ".join(map(str, vals[:limit]))
    return f"[{s}{', ...' if len(vals) > limit else ''}] ({len(vals)} distinct)"


def invalid_values(arr: np.ndarray, allow_void_19: bool = False) -> np.ndarray:
    """Sorted distinct values of ``arr`` outside 0..18 and 255 (and 19 if ``allow_void_19``)."""
    a = np.asarray(arr)
    if a.dtype == np.uint8:
        present = np.flatnonzero(np.bincount(a.ravel(), minlength=256))
        ok = (present < NUM_CLASSES) | (present == IGNORE) | (allow_void_19 & (present == VOID_CHANNEL))
        return present[~ok]
    ok = ((a >= 0) & (a < NUM_CLASSES)) | (a == IGNORE)
    if allow_void_19:
        ok |= a == VOID_CHANNEL
    return np.unique(a[~ok])


def validate_label(arr, source: str = "label", allow_void_19: bool = False) -> np.ndarray:
    """Check that ``arr`` is an integer label map with values in 0..18 and 255; return it as uint8
    (the same array when it already is uint8). Raises ``LabelError`` naming ``source`` and the bad
    values. Any shape is accepted (batches too)."""
    if isinstance(arr, torch.Tensor):
        arr = arr.detach().cpu().numpy()
    a = np.asarray(arr)
    if not np.issubdtype(a.dtype, np.integer):
        raise LabelError(f"{source}: label must have an integer dtype, got {a.dtype}")
    bad = invalid_values(a, allow_void_19=allow_void_19)
    if bad.size:
        allowed = "0..19 and 255" if allow_void_19 else "0..18 and 255"
        raise LabelError(f"{source}: label values must be in {allowed}; found {_fmt_values(bad)}")
    return a if a.dtype == np.uint8 else a.astype(np.uint8)


def read_png_indices(path: str | os.PathLike) -> np.ndarray:
    """The stored values of a single-channel PNG: grey levels for mode L, palette *indices* for
    mode P (not the colours), and 16/32-bit integer images checked to fit 0..255. uint8 (H, W)."""
    return _read_png(path)[0]


def _read_png(path: str | os.PathLike) -> tuple[np.ndarray, list[int] | None]:
    """`read_png_indices` and, for mode P, the palette (flat RGB list)."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            mode = im.mode
            if mode in ("L", "P"):
                return np.array(im, dtype=np.uint8), (im.getpalette() or []) if mode == "P" else None
            if mode in ("I", "I;16", "I;16B", "I;16L"):
                a = np.array(im).astype(np.int64)
                if a.size and (a.min() < 0 or a.max() > 255):
                    bad = np.unique(a[(a < 0) | (a > 255)])
                    raise LabelError(f"{path}: values must fit 0..255, found {_fmt_values(bad)}")
                return a.astype(np.uint8), None
    except OSError as e:
        raise LabelError(f"{path}: cannot read label image ({e})") from e
    raise LabelError(f"{path}: label PNG must be single-channel (mode L or P), got mode {mode!r}")


def load_label(path: str | os.PathLike, palette_ids: bool = False) -> np.ndarray:
    """Load a trainId label PNG (mode L or P; for P the index values) as uint8 (H, W), validated:
    values outside 0..18 and 255 raise ``LabelError`` naming the file and the values.

    A palette (mode P) file is read as train ids only when its palette gives each class it holds
    that class's colour (`save_label(palette=True)` writes such files) or `palette_ids` says its
    indices are train ids: a colour label saved as a palette PNG holds palette slots, not classes,
    and is refused with the command that converts it."""
    a, palette = _read_png(path)
    a = validate_label(a, source=str(path))
    if palette is not None and not palette_ids:
        present = np.flatnonzero(np.bincount(a.ravel(), minlength=256)[:NUM_CLASSES])
        table = np.zeros((256, 3), np.int64)
        table[: len(palette) // 3] = np.asarray(palette[: len(palette) // 3 * 3]).reshape(-1, 3)
        if not np.array_equal(table[present], PALETTE[present]):
            raise LabelError(f"{path}: a palette PNG whose colours are not the trainId colours, so its indices "
                             f"are palette slots, not train ids; convert a colour label with `python -m "
                             f"segmentation.labels convert --source color FOLDER` (or, if the indices are train ids, "
                             f"load it with palette_ids=True)")
    return a


def save_label(label, path: str | os.PathLike, palette: bool = False) -> None:
    """Write a trainId label atomically as an 8-bit PNG, values unchanged (void stays 255).
    ``palette=True`` writes mode P with the Cityscapes colours (indices are still the train ids)."""
    a = validate_label(label, source=str(path))
    if a.ndim != 2:
        raise LabelError(f"{path}: a label image must be 2-D, got shape {a.shape}")
    h, w = a.shape
    im = Image.frombytes("P" if palette else "L", (w, h), np.ascontiguousarray(a).tobytes())
    if palette:
        im.putpalette(COLOR_LUT.ravel().tolist())
    with atomic_file(path) as tmp:
        im.save(tmp, format="PNG")


# --------------------------------------------------------------------------------------------
# One-hot and colours
# --------------------------------------------------------------------------------------------
def _as_index_tensor(label) -> torch.Tensor:
    if isinstance(label, torch.Tensor):
        return label
    if isinstance(label, Image.Image):
        label = np.array(label)
    a = np.ascontiguousarray(label)
    if a.dtype.kind == "u" and a.dtype != np.uint8:  # torch lacks most ops on uint16/32/64
        a = a.astype(np.int64)
    return torch.from_numpy(a)


def one_hot(label, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """(H, W) -> (20, H, W) or (B, H, W) -> (B, 20, H, W) one-hot, 255 -> channel 19.

    Accepts numpy arrays, PIL images (mode L/P indices) and integer tensors; never mutates its
    input. Value 19 (what the original wrote into its labels) is accepted as void too; anything
    else outside 0..18 raises ``LabelError``. Equals ``np.eye(20)[label_with_255_as_19]`` with the
    class axis moved to the channel position (the original's float64 H×W×20 layout).
    """
    t = _as_index_tensor(label)
    if t.dim() not in (2, 3):
        raise LabelError(f"one_hot expects (H, W) or (B, H, W), got shape {tuple(t.shape)}")
    if t.is_floating_point() or t.is_complex():
        raise LabelError(f"one_hot expects integer labels, got {t.dtype}")
    if device is not None:
        t = t.to(device)
    t = t.long()  # may alias an int64 input; only out-of-place ops below
    bad = ~(((t >= 0) & (t <= VOID_CHANNEL)) | (t == IGNORE))
    if bool(bad.any()):
        raise LabelError(f"one_hot: label values must be in 0..19 and 255; found "
                         f"{_fmt_values(torch.unique(t[bad]).tolist())}")
    t = torch.where(t == IGNORE, torch.full_like(t, VOID_CHANNEL), t)
    oh = F.one_hot(t, NUM_CHANNELS)  # (..., H, W, 20)
    return oh.movedim(-1, -3).to(dtype).contiguous()


def colorize(label) -> np.ndarray:
    """uint8 RGB (..., 3) with the Cityscapes palette; 19, 255 and anything else are black."""
    if isinstance(label, torch.Tensor):
        label = label.detach().cpu().numpy()
    a = np.asarray(label)
    if a.dtype != np.uint8:
        a = np.where((a >= 0) & (a < 256), a, IGNORE).astype(np.uint8)
    return COLOR_LUT[a]


# --------------------------------------------------------------------------------------------
# Folder conversion: raw ids -> *_labelTrainIds.png
# --------------------------------------------------------------------------------------------
def train_id_path(raw_path: str | os.PathLike) -> Path:
    """``X_labelIds.png`` -> ``X_labelTrainIds.png``; any other ``X.png`` -> ``X_labelTrainIds.png``."""
    p = Path(raw_path)
    stem = p.name[: -len(".png")] if p.name.endswith(".png") else p.stem
    if stem.endswith("_labelIds"):
        stem = stem[: -len("_labelIds")]
    return p.with_name(stem + TRAIN_ID_SUFFIX)


def find_raw_labels(folder: str | os.PathLike, source: str, recursive: bool = False) -> list[Path]:
    """Raw label PNGs of a folder, sorted. Cityscapes: ``*_labelIds.png`` (the folders also hold
    ``_color``/``_instanceIds`` files); GTA, Mapillary and colour labels: every ``*.png`` that is
    not a ``*_labelTrainIds.png``. Hidden files are skipped."""
    if source not in SOURCES:
        raise ValueError(f"unknown label source {source!r}; expected one of {SOURCES}")
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"not a folder: {folder}")
    pattern = "*_labelIds.png" if source == "cityscapes" else "*.png"
    files = folder.rglob(pattern) if recursive else folder.glob(pattern)
    return sorted(p for p in files
                  if p.is_file() and not p.name.startswith(".") and not p.name.endswith(TRAIN_ID_SUFFIX))


def convert_file(raw_path: str | os.PathLike, source: str, overwrite: bool = False) -> bool:
    """Convert one raw label PNG; returns False when the output already existed (skipped)."""
    out = train_id_path(raw_path)
    if out.exists() and not overwrite:
        return False
    if source == "color":
        try:
            with Image.open(raw_path) as im:
                raw = np.array(im.convert("RGB"))
        except OSError as e:
            raise LabelError(f"{raw_path}: cannot read label image ({e})") from e
    else:
        raw = read_png_indices(raw_path)
    save_label(to_train_ids(raw, source), out)
    return True


def _convert_one(args: tuple[str, str, bool]) -> bool:
    return convert_file(*args)


def convert_folder(folder: str | os.PathLike, source: str, recursive: bool = False,
                   overwrite: bool = False, workers: int = 1) -> dict[str, list[Path]]:
    """Write ``*_labelTrainIds.png`` (mode L) next to every raw label of ``folder``.

    Each output is written to a hidden temporary file and renamed into place, so an interrupted
    run never leaves a partial PNG; files whose output exists are skipped unless ``overwrite``.
    Returns ``{"written": [...], "skipped": [...]}`` (output paths)."""
    raws = find_raw_labels(folder, source, recursive)
    jobs = [(str(p), source, overwrite) for p in raws]
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=workers) as ex:
            done = list(ex.map(_convert_one, jobs, chunksize=16))
    else:
        done = [_convert_one(j) for j in jobs]
    report: dict[str, list[Path]] = {"written": [], "skipped": []}
    for p, wrote in zip(raws, done):
        report["written" if wrote else "skipped"].append(train_id_path(p))
    return report


def label_files(folder: str | os.PathLike, pattern: str = "*" + TRAIN_ID_SUFFIX, recursive: bool = False) -> list[Path]:
    """The files of `folder` matching `pattern`, sorted; ``FileNotFoundError`` for a missing folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"not a folder: {folder}")
    return sorted(p for p in (folder.rglob(pattern) if recursive else folder.glob(pattern)) if p.is_file())


def check_folder(folder: str | os.PathLike, pattern: str = "*" + TRAIN_ID_SUFFIX,
                 recursive: bool = False) -> list[str]:
    """Validate every trainId label of a folder; returns the error messages (empty when all pass)."""
    errors = []
    for p in label_files(folder, pattern, recursive):
        try:
            load_label(p)
        except LabelError as e:
            errors.append(str(e))
    return errors


def get_parser():
    ap = cli.parser("python -m segmentation.labels", __doc__, common=False)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = cli.add_subcommand(sub, "convert", "raw label ids (or trainId colours) -> *_labelTrainIds.png next to them")
    c.add_argument("folder", help="folder of raw label PNGs")
    c.add_argument("--source", required=True, choices=SOURCES,
                   help="what the files hold: GTA / Cityscapes / Mapillary ids, or trainId colours (color)")
    c.add_argument("--recursive", action="store_true", help="also convert sub-folders")
    c.add_argument("--overwrite", action="store_true", help="re-convert existing outputs")
    c.add_argument("--workers", type=cli.positive_int, default=1, help="processes converting files")
    k = cli.add_subcommand(sub, "check", "validate *_labelTrainIds.png files (values 0..18, 255)")
    k.add_argument("folder", help="folder of trainId label PNGs")
    k.add_argument("--pattern", default="*" + TRAIN_ID_SUFFIX, help="file name pattern")
    k.add_argument("--recursive", action="store_true", help="also check sub-folders")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    if args.cmd == "convert":
        r = convert_folder(args.folder, args.source, args.recursive, args.overwrite, args.workers)
        print(f"converted {len(r['written'])}, skipped {len(r['skipped'])} (already converted)")
        return 0
    files = label_files(args.folder, args.pattern, args.recursive)
    if not files:
        raise LabelError(f"{args.folder}: no file matches {args.pattern!r}"
                         + ("" if args.recursive else " (sub-folders: --recursive)"))
    errors = check_folder(args.folder, args.pattern, args.recursive)
    for e in errors:
        print(e, file=sys.stderr)
    print(f"{len(files)} file(s) checked, {len(errors)} invalid")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(cli.run_cli(main))
