"""Segmentation datasets: folder layouts, (image, label) pairing, loading with id -> trainId
conversion, rare-class sampling for the source set, and the source/generated mixture.

Layouts (as DGInStyle-SegModel and its dataset conversion scripts expect them; ``{split}`` is the
split folder):

| layout | images | labels | image / label suffix | labels hold |
|---|---|---|---|---|
| gta | images | labels | .png / _labelTrainIds.png | trainIds |
| gta_raw | images | labels | .png / .png | GTA ids (LUT) |
| cityscapes | leftImg8bit/{split} (cities) | gtFine/{split} | _leftImg8bit.png / _gtFine_labelTrainIds.png | trainIds |
| cityscapes_raw | same | same | ... / _gtFine_labelIds.png | Cityscapes ids (LUT) |
| bdd100k | images/10k/{split} | labels/sem_seg/masks/{split} | .jpg / .png | trainIds |
| mapillary | {split}/images | {split}/labels | .jpg / _labelTrainIds.png | trainIds |
| mapillary_raw | {split}/images | {split}/labels | .jpg / .png | Vistas v1.2 ids (LUT) |
| acdc | rgb_anon (any depth; a path folder named {split}) | gt | _rgb_anon.png / _gt_labelTrainIds.png | trainIds |
| dark_zurich | same as acdc | | | trainIds |
| folder | images | labels | .png/.jpg/.jpeg / _labelTrainIds.png or .png | trainIds |
| dginstyle | manifest.jsonl (``image``/``label`` relative paths) | | | trainIds |
| jsonl | a JSON-lines file as the root (``image``, ``conditioning_image``, ``text``) | | | trainIds (``conditioning_image``'s ``_labelTrainIds.png`` sibling) |

``paired`` is another name for ``folder``. ``jsonl`` is the dataset file of DGInStyle's ControlNet
training; relative paths in it are tried against the file's folder, then the working directory.
An image without its trainId label in a layout that has a raw twin (``gta`` / ``gta_raw``,
``cityscapes``, ``mapillary``) is reported with the ``segmentation.labels convert`` command that
makes the missing files.

ACDC and Dark Zurich are found both as shipped (``rgb_anon/<condition>/val/<seq>/...``) and
flattened (``rgb_anon/val/...``, as SegModel's README does with rsync). Mapillary accepts
``val``/``train`` for ``validation``/``training``.

Mixing: ``MixedDataset`` draws sample k of rank r with ``default_rng([seed, r, k])``:
first the group (source or generated) with the requested ratio, or uniformly over the union when
no ratio is given (what SegModel's DGDataset intended, ``P(gen) = N_gen / (N_src + N_gen)``), then
the file (rare-class sampling if enabled) and every augmentation draw. The original builder never
constructs the generated half (its ``builder.py`` ignores the second source); here both are built
and really read.
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .labels import IGNORE, LUTS, NUM_CLASSES, TRAIN_ID_SUFFIX, LabelError, read_png_indices, to_train_ids, train_id_path
from .labels import load_label as read_train_ids
from .rcs import DEFAULT_MIN_PIXELS, DEFAULT_TEMPERATURE, ClassStats, RareClassSampler, class_stats
from .transforms import TestPipeline, TrainPipeline, resize_label


class DatasetError(ValueError):
    """A dataset folder that does not match its layout: missing folders, unpaired files, bad manifest."""


@dataclass(frozen=True)
class Layout:
    name: str
    img_dir: str  # relative to the root; "{split}" is replaced by the split
    ann_dir: str
    img_suffixes: tuple[str, ...]
    seg_suffixes: tuple[str, ...]  # tried in order for each image
    recursive: bool = False
    split_component: bool = False  # the split is a folder somewhere below img_dir / ann_dir
    converter: str | None = None  # raw ids -> trainIds via segmentation.labels.LUTS[converter]
    default_split: str | None = None
    split_aliases: dict = field(default_factory=dict)
    exclude_suffix: str | None = None  # label files to skip (converted files next to raw ones)
    test_scale: tuple[int, int] | None = (1024, 512)  # SegModel's test resize (keep ratio, long x short); None: native
    fix_size_mismatch: bool = False  # resize a label to its image when sizes differ (GTA has a few)


_IMG = (".png", ".jpg", ".jpeg")
LAYOUTS: dict[str, Layout] = {
    "gta": Layout("gta", "images", "labels", (".png",), (TRAIN_ID_SUFFIX,), test_scale=(1280, 720),
                  fix_size_mismatch=True),
    "gta_raw": Layout("gta_raw", "images", "labels", (".png",), (".png",), converter="gta",
                      exclude_suffix=TRAIN_ID_SUFFIX, test_scale=(1280, 720), fix_size_mismatch=True),
    "cityscapes": Layout("cityscapes", "leftImg8bit/{split}", "gtFine/{split}", ("_leftImg8bit.png",),
                         ("_gtFine_labelTrainIds.png",), recursive=True, default_split="val"),
    "cityscapes_raw": Layout("cityscapes_raw", "leftImg8bit/{split}", "gtFine/{split}", ("_leftImg8bit.png",),
                             ("_gtFine_labelIds.png",), recursive=True, default_split="val", converter="cityscapes"),
    "bdd100k": Layout("bdd100k", "images/10k/{split}", "labels/sem_seg/masks/{split}", (".jpg",), (".png",),
                      default_split="val"),
    "mapillary": Layout("mapillary", "{split}/images", "{split}/labels", (".jpg",), (TRAIN_ID_SUFFIX,),
                        default_split="validation", split_aliases={"val": "validation", "train": "training"}),
    "mapillary_raw": Layout("mapillary_raw", "{split}/images", "{split}/labels", (".jpg",), (".png",),
                            default_split="validation", split_aliases={"val": "validation", "train": "training"},
                            converter="mapillary", exclude_suffix=TRAIN_ID_SUFFIX),
    "acdc": Layout("acdc", "rgb_anon", "gt", ("_rgb_anon.png",), ("_gt_labelTrainIds.png",), recursive=True,
                   split_component=True, default_split="val", test_scale=(960, 540)),
    "dark_zurich": Layout("dark_zurich", "rgb_anon", "gt", ("_rgb_anon.png",), ("_gt_labelTrainIds.png",),
                          recursive=True, split_component=True, default_split="val", test_scale=(960, 540)),
    "folder": Layout("folder", "images", "labels", _IMG, (TRAIN_ID_SUFFIX, ".png"), test_scale=None),
    "dginstyle": Layout("dginstyle", "images", "labels", (".png",), (TRAIN_ID_SUFFIX,), test_scale=(512, 512)),
    "jsonl": Layout("jsonl", ".", ".", _IMG, (TRAIN_ID_SUFFIX,), test_scale=None),
}
_ALIASES = {"darkzurich": "dark_zurich", "bdd": "bdd100k", "gen": "dginstyle", "generated": "dginstyle",
            "paired": "folder"}
BENCHMARKS = ("cityscapes", "bdd100k", "mapillary", "acdc", "dark_zurich")
for _raw in [k for k in LAYOUTS if k.endswith("_raw")]:
    assert LAYOUTS[_raw].converter in LUTS


def get_layout(layout: str | Layout) -> Layout:
    if isinstance(layout, Layout):
        return layout
    key = layout.lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in LAYOUTS:
        raise DatasetError(f"unknown dataset layout {layout!r}; known: {', '.join(LAYOUTS)}")
    return LAYOUTS[key]


def _few(paths, n=5) -> str:
    paths = list(paths)
    return ", ".join(str(p) for p in paths[:n]) + (f", ... ({len(paths) - n} more)" if len(paths) > n else "")


def _strip(name: str, suffixes: Sequence[str]) -> str | None:
    for s in suffixes:
        if name.endswith(s):
            return name[: -len(s)]
    return None


def _scan(folder: Path, suffixes, recursive: bool, split: str | None, exclude: str | None) -> dict[str, Path]:
    """{key: path}: key = relative path without the suffix; only files under a ``split`` folder
    component when ``split`` is given."""
    out: dict[str, Path] = {}
    it = folder.rglob("*") if recursive else folder.iterdir()
    for p in it:
        if p.name.startswith(".") or (exclude and p.name.endswith(exclude)) or not p.is_file():
            continue
        rel = p.relative_to(folder)
        if split is not None and split not in rel.parts[:-1]:
            continue
        stem = _strip(p.name, suffixes)
        if stem is None:
            continue
        key = (rel.parent / stem).as_posix()
        if key in out:  # two suffixes for one stem (folder layout: x_labelTrainIds.png and x.png)
            if suffixes.index(_suffix_of(out[key].name, suffixes)) <= suffixes.index(_suffix_of(p.name, suffixes)):
                continue
        out[key] = p
    return out


def _suffix_of(name, suffixes):
    return next(s for s in suffixes if name.endswith(s))


def _json_lines(path: Path) -> Iterator[tuple[int, object]]:
    """(line number, parsed value) of each non-blank line; None for a line that is not JSON."""
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError:
                yield n, None


def convert_command(source: str, folder: str | os.PathLike, recursive: bool = False) -> str:
    """The command that writes ``*_labelTrainIds.png`` next to the raw ``source`` labels of ``folder``."""
    return f"python -m segmentation.labels convert --source {source} {folder}" + (" --recursive" if recursive else "")


def read_manifest(root: str | os.PathLike, labels: bool = True) -> list[dict]:
    """The records of a DGInStyle output folder's ``manifest.jsonl`` (mrlf.generate), one per
    sample id (a regenerated sample's later line wins), with ``image_path`` and ``label_path``
    added (absolute). Lines that are not complete records (torn by a killed run; mrlf.generate
    skips them too and redoes the sample) are skipped with a warning; a listed file that is
    missing, or a manifest without any record, raises ``DatasetError``. ``labels=False`` reads
    unlabelled output too (mrlf.didex's pseudo-target images): a record then needs only its image,
    and ``label_path`` is added where it has a label."""
    root = Path(root)
    manifest = root / "manifest.jsonl"
    if not manifest.is_file():
        raise DatasetError(f"{root}: no manifest.jsonl (a DGInStyle output folder of mrlf.generate has one); "
                           f"use the 'folder' layout for a plain images/ + labels/ folder")
    records: dict[str, dict] = {}
    bad = []
    for n, rec in _json_lines(manifest):
        try:
            key = str(rec["id"])
            rec["image_path"] = str(root / rec["image"])
            if labels or "label" in rec:
                rec["label_path"] = str(root / rec["label"])
        except (KeyError, TypeError):
            bad.append(n)  # a line torn by a killed run (mrlf.generate redoes that sample on resume)
            continue
        records.pop(key, None)
        records[key] = rec
    if bad:
        warnings.warn(f"{manifest}: skipping {len(bad)} incomplete line(s) (line {', '.join(map(str, bad[:5]))})")
    missing = [r[k] for r in records.values() for k in ("image_path", "label_path")
               if k in r and not Path(r[k]).is_file()]
    if missing:
        raise DatasetError(f"{manifest}: {len(missing)} file(s) listed but missing: {_few(missing)}")
    if not records:
        raise DatasetError(f"{manifest}: no samples")
    return list(records.values())


def _existing(name: str, dataset_file: Path, what: str, line_no: int) -> Path:
    path = Path(name)
    cands = [path] if path.is_absolute() else [dataset_file.parent / path, Path.cwd() / path]
    for c in cands:
        if c.exists():
            return c
    raise DatasetError(f"{dataset_file}:{line_no}: {what} {name!r} not found (tried {_few(cands)})")


def read_dataset_file(path: str | os.PathLike) -> list[dict]:
    """The records of a ``jsonl`` dataset file (DGInStyle's ControlNet training data: one object per
    line with ``image``, ``conditioning_image``, the raw label, and ``text``), with ``image_path`` and
    ``label_path`` added: the image and the trainId sibling of the raw label. Any line that is not
    such a record, or names a missing file, raises ``DatasetError`` naming the line."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: the jsonl layout needs a dataset file")
    records = []
    for n, row in _json_lines(path):
        if row is None:
            raise DatasetError(f"{path}:{n}: not a JSON object; the dataset file has one object per line")
        if not isinstance(row, dict) or not {"image", "conditioning_image"} <= set(row):
            raise DatasetError(f"{path}:{n}: needs keys 'image' and 'conditioning_image' (and 'text'), "
                               f"got {sorted(row) if isinstance(row, dict) else type(row).__name__}")
        image = _existing(row["image"], path, "image", n)
        raw = _existing(row["conditioning_image"], path, "conditioning_image", n)
        label = raw if raw.name.endswith(TRAIN_ID_SUFFIX) else train_id_path(raw)
        if not label.is_file():
            raise DatasetError(f"{path}:{n}: the trainId label {label} is missing. Convert the raw label ids once "
                               f"with:  {convert_command('gta', raw.parent)}")
        records.append({**row, "image_path": str(image), "label_path": str(label)})
    if not records:
        raise DatasetError(f"{path}: empty dataset file")
    return records


def _without_label(lay: Layout, ann_dir: Path, images: dict[str, Path]) -> str:
    """The report on images whose label is missing (``images``: key -> image path). For a layout
    with a raw twin (gta / gta_raw) it tells apart the images whose raw label is there (only the
    trainId file is missing) from those without any label, and gives the converter's command."""
    suffix = lay.seg_suffixes[0]
    msg = f"{len(images)} image(s) without a label in {ann_dir} (expected <name>{suffix})"
    raw = LAYOUTS.get(lay.name + "_raw")
    if raw is None:
        return f"{msg}: {_few(images.values())}"
    expected = {k: ann_dir / (k + suffix) for k in images}
    convertible = [k for k in images if (ann_dir / (k + raw.seg_suffixes[0])).is_file()]
    unlabelled = [k for k in images if k not in convertible]
    cmd = convert_command(raw.converter, ann_dir, raw.recursive)
    parts = []
    if convertible:
        parts.append(f"{len(convertible)} trainId label file(s) are missing, e.g. "
                     f"{_few(expected[k] for k in convertible)}; the raw ids are there: convert them once with:  {cmd}")
    if unlabelled:
        parts.append(f"{len(unlabelled)} image(s) have no label at all, e.g. "
                     + _few(f"{images[k].name} (no {expected[k].name})" for k in unlabelled)
                     + f"; trainId labels are made from raw ids with:  {cmd}")
    return f"{msg}: " + "; ".join(parts)


def _layout_folders(root: Path, lay: Layout, split: str | None, labels: bool) -> tuple[Path, Path, str | None]:
    """(image folder, label folder, split) of a layout under ``root``; the folders must exist (the
    label folder only when ``labels``)."""
    split = split if split is not None else lay.default_split
    split = lay.split_aliases.get(split, split)
    need_split = "{split}" in lay.img_dir or lay.split_component
    if need_split and split is None:
        raise DatasetError(f"layout {lay.name} needs a split")
    img_dir = root / lay.img_dir.format(split=split)
    ann_dir = root / lay.ann_dir.format(split=split)
    for what, d in (("image", img_dir), ("label", ann_dir))[: 2 if labels else 1]:
        if not d.is_dir():
            raise DatasetError(f"{lay.name} layout: the {what} folder {d} does not exist "
                               f"(expected {lay.img_dir!r} / {lay.ann_dir!r} under {root}, split {split!r})")
    return img_dir, ann_dir, split


def _scan_images(img_dir: Path, lay: Layout, split: str | None) -> dict[str, Path]:
    comp = split if lay.split_component else None
    images = _scan(img_dir, lay.img_suffixes, lay.recursive, comp, None)
    if not images:
        raise DatasetError(f"{img_dir}: no images ending in {' / '.join(lay.img_suffixes)}"
                           + (f" under a '{split}' folder" if comp else ""))
    return images


def find_pairs(root: str | os.PathLike, layout: str | Layout, split: str | None = None,
               strict: bool = True) -> list[tuple[Path, Path]]:
    """Sorted (image, label) path pairs of a dataset folder in ``layout`` (for ``dginstyle`` and
    ``jsonl``: in the order of the manifest / dataset file).

    Raises ``DatasetError`` when the root or a layout folder is missing, when no image is found,
    and (``strict``) when images lack labels or labels lack images, naming a few of each. With
    ``strict=False`` unpaired files are dropped with a warning."""
    lay = get_layout(layout)
    root = Path(root)
    if lay.name == "jsonl":
        return [(Path(r["image_path"]), Path(r["label_path"])) for r in read_dataset_file(root)]
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} does not exist (layout {lay.name})")
    if lay.name == "dginstyle":
        return [(Path(r["image_path"]), Path(r["label_path"])) for r in read_manifest(root)]
    img_dir, ann_dir, split = _layout_folders(root, lay, split, labels=True)
    comp = split if lay.split_component else None
    images = _scan_images(img_dir, lay, split)
    labels = _scan(ann_dir, lay.seg_suffixes, lay.recursive, comp, lay.exclude_suffix)
    no_label = sorted(set(images) - set(labels))
    no_image = sorted(set(labels) - set(images))
    if no_label or no_image:
        msg = []
        if no_label:
            msg.append(_without_label(lay, ann_dir, {k: images[k] for k in no_label}))
        if no_image:
            msg.append(f"{len(no_image)} label(s) without an image in {img_dir}: {_few(labels[k] for k in no_image)}")
        if strict:
            raise DatasetError(f"{root} ({lay.name}): " + "; ".join(msg))
        warnings.warn(f"{root} ({lay.name}): skipping unpaired files: " + "; ".join(msg))
    return [(images[k], labels[k]) for k in sorted(set(images) & set(labels))]


def find_images(root: str | os.PathLike, layout: str | Layout | None = None, split: str | None = None) -> list[Path]:
    """Image paths of an unlabelled set (a domain-adaptation target); no label is read or needed.

    Without a layout: a folder with a ``manifest.jsonl`` (the output of mrlf.generate or
    mrlf.didex) gives its records' images in manifest order, any other folder every .png / .jpg /
    .jpeg file below it (recursively, sorted; point it at the image folder). With a layout: the
    images of its image folder and split (e.g. ``cityscapes`` train, Dark Zurich's unlabelled
    ``rgb_anon``)."""
    root = Path(root)
    lay = None if layout is None else get_layout(layout)
    if lay is not None and lay.name == "jsonl":
        return [Path(r["image_path"]) for r in read_dataset_file(root)]
    if not root.is_dir():
        raise DatasetError(f"image folder {root} does not exist")
    generated = lay.name == "dginstyle" if lay is not None else (root / "manifest.jsonl").is_file()
    if generated:
        return [Path(r["image_path"]) for r in read_manifest(root, labels=False)]
    if lay is None:
        found = sorted(p for p in root.rglob("*")
                       if p.suffix.lower() in _IMG and not p.name.startswith(".") and p.is_file())
        if not found:
            raise DatasetError(f"{root}: no images (.png, .jpg, .jpeg) in this folder or below it")
        return found
    img_dir, _, split = _layout_folders(root, lay, split, labels=False)
    return [p for _, p in sorted(_scan_images(img_dir, lay, split).items())]


def parse_image_spec(spec: str) -> tuple[Layout | None, Path]:
    """``"layout:PATH"`` -> (Layout, Path); a bare PATH -> (None, Path)."""
    name, sep, path = spec.partition(":")
    if sep and name.lower().replace("-", "_") in {*LAYOUTS, *_ALIASES}:
        return get_layout(name), Path(path)
    return None, Path(spec)


def parse_spec(spec: str, default_layout: str | None = None) -> tuple[Layout, Path]:
    """``"layout:PATH"`` (or a bare PATH with ``default_layout``) -> (Layout, Path)."""
    layout, path = parse_image_spec(spec)
    if layout is not None:
        return layout, path
    if default_layout is None:
        raise DatasetError(f"dataset spec {spec!r} must be LAYOUT:PATH with LAYOUT one of {', '.join(LAYOUTS)}")
    return get_layout(default_layout), Path(spec)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
def load_image(path: str | os.PathLike) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"))  # writable (torch.from_numpy warns on read-only arrays)
    except OSError as e:
        raise DatasetError(f"{path}: cannot read image ({e})") from e


class SegDataset(Dataset):
    """(image, label) pairs of one folder. ``load(i)`` -> (uint8 RGB (H, W, 3), uint8 trainIds
    (H, W)); raw-id layouts are converted with their LUT, trainId labels are validated (values
    0..18 and 255, else ``LabelError`` naming the file). ``__getitem__`` gives evaluation samples
    (image resized to ``test_scale`` and normalised; label at full size)."""

    def __init__(self, root: str | os.PathLike, layout: str | Layout, split: str | None = None,
                 strict: bool = True, test_scale: tuple[int, int] | None | str = "layout",
                 pairs: Sequence[tuple[Path, Path]] | None = None):
        self.layout = get_layout(layout)
        self.root = Path(root)
        self.split = split
        self.pairs = list(pairs) if pairs is not None else find_pairs(root, self.layout, split, strict)
        scale = self.layout.test_scale if test_scale == "layout" else test_scale
        self.test_pipeline = TestPipeline(scale)

    def __len__(self) -> int:
        return len(self.pairs)

    def load_label(self, i: int) -> np.ndarray:
        path = self.pairs[i][1]
        if self.layout.converter is not None:
            return to_train_ids(read_png_indices(path), self.layout.converter)
        return read_train_ids(path)

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        img_path, lab_path = self.pairs[i]
        image, label = load_image(img_path), self.load_label(i)
        if image.shape[:2] != label.shape:
            if not self.layout.fix_size_mismatch:
                raise LabelError(f"{lab_path}: label size {label.shape[::-1]} differs from its image "
                                 f"{img_path} {image.shape[1::-1]} (W x H)")
            label = resize_label(label, image.shape[:2])
        return image, label

    def __getitem__(self, i: int) -> dict:
        image, label = self.load(i)
        return {"image": self.test_pipeline(image), "label": torch.from_numpy(label.astype(np.int64)),
                "index": i, "path": str(self.pairs[i][0])}


# --------------------------------------------------------------------------------------------
# Training sources and the mixture
# --------------------------------------------------------------------------------------------
def pair_class_stats(ds: SegDataset, cache: str | os.PathLike | bool = True,
                     purpose: str = "class statistics") -> tuple[ClassStats, np.ndarray]:
    """Per-class pixel counts of a dataset's labels (``segmentation.rcs.class_stats``, cached per
    label folder) and, for each row of the statistics, the index of its pair in ``ds.pairs``.
    Needs trainId labels (``DatasetError`` for a raw-id layout, with the conversion command)."""
    if ds.layout.converter is not None:
        raise DatasetError(f"{purpose} needs trainId labels; convert {ds.root} first "
                           f"(python -m segmentation.labels convert --source {ds.layout.converter} ...) "
                           f"and use the {ds.layout.name.removesuffix('_raw')} layout")
    folders = {p.parent for _, p in ds.pairs}
    top = Path(os.path.commonpath([str(f) for f in folders]))
    patterns = {"*" + _suffix_of(p.name, ds.layout.seg_suffixes) for _, p in ds.pairs}
    index = {p.resolve(): i for i, (_, p) in enumerate(ds.pairs)}
    recursive = len(folders) > 1 or top not in folders
    parts = [class_stats(top, pattern=p, recursive=recursive, cache=cache) for p in sorted(patterns)]
    rows, files, counts, void, shapes, seen = [], [], [], [], [], set()
    for st in parts:
        for j, rel in enumerate(st.files):
            i = index.get((st.folder / rel).resolve())
            if i is None or i in seen:
                continue  # another split, an unpaired label, or matched by two patterns
            seen.add(i)
            rows.append(i)
            files.append(Path(os.path.relpath(ds.pairs[i][1], top)).as_posix())
            counts.append(st.counts[j])
            void.append(st.void[j])
            shapes.append(st.shapes[j])
    stats = ClassStats(top, files, np.array(counts, dtype=np.int64).reshape(-1, NUM_CLASSES),
                       np.array(void, dtype=np.int64), np.array(shapes, dtype=np.int64).reshape(-1, 2))
    return stats, np.array(rows, dtype=np.int64)


@dataclass(frozen=True)
class RCSConfig:
    temperature: float = DEFAULT_TEMPERATURE  # 0.01
    min_pixels: int = DEFAULT_MIN_PIXELS  # eligible files have > 3000 pixels of the class
    min_crop_ratio: float = 0.5  # re-crop until the crop has > min_pixels * ratio (1500) pixels
    tries: int = 10


class TrainSource:
    """One training dataset with its pipeline and, optionally, rare-class sampling.

    ``draw(rng)`` picks a file (uniform, or RCS: class c ~ P then a file with > min_pixels of c,
    then up to ``tries`` crops until the crop holds > min_pixels * min_crop_ratio pixels of c,
    the last crop otherwise) and returns (image (3, h, w), label (h, w) int64, file index)."""

    def __init__(self, dataset: SegDataset, pipeline: TrainPipeline, rcs: RCSConfig | None = None,
                 stats_cache: str | os.PathLike | bool = True):
        self.dataset, self.pipeline, self.rcs = dataset, pipeline, rcs
        self.sampler = None
        if rcs is not None:
            self.sampler = RareClassSampler(self._stats(stats_cache), rcs.temperature, rcs.min_pixels)

    def __len__(self):
        return len(self.dataset)

    def _stats(self, cache) -> ClassStats:
        stats, self._rcs_pair = pair_class_stats(self.dataset, cache, "rare-class sampling")
        return stats

    def draw(self, rng: np.random.Generator):
        pipe = self.pipeline
        if self.sampler is None:
            i = int(rng.integers(len(self.dataset)))
            image, label = self.dataset.load(i)
            image, label = pipe.geometric(image, label, rng)
        else:
            c, j = self.sampler.sample(rng)
            i = int(self._rcs_pair[j])
            image, label = self.dataset.load(i)
            image, label = pipe.resize(image, label, rng)
            need = self.rcs.min_pixels * self.rcs.min_crop_ratio
            for _ in range(max(self.rcs.tries, 1)):
                ci, cl = pipe.take_crop(image, label, rng)
                if self.rcs.min_crop_ratio <= 0 or np.count_nonzero(cl == c) > need:
                    break
            image, label = ci, cl
        img, lab = pipe.finish(image, label, rng)
        return img, lab, i


def parse_ratio(ratio: str | Sequence[float] | None, n: int) -> np.ndarray | None:
    """"1:1" / "3:1" / [1, 3] -> normalised weights of length n; None stays None."""
    if ratio is None:
        return None
    vals = [float(v) for v in (ratio.split(":") if isinstance(ratio, str) else ratio)]
    if len(vals) != n or any(v < 0 for v in vals) or sum(vals) <= 0:
        raise ValueError(f"mixing ratio {ratio!r} needs {n} non-negative weights with a positive sum")
    w = np.array(vals, dtype=np.float64)
    return w / w.sum()


class MixedDataset(Dataset):
    """Training samples drawn from several groups of sources (e.g. [GTA], [DGInStyle output]).

    ``ratio``: weights per group ("1:1"); None means uniform over the union of all files, so group
    g is drawn with probability N_g / N. Within a group a source is drawn proportionally to its
    size. Item k is a pure function of (seed, rank, k): any DataLoader worker count, resume at any
    step and per-rank distinct data. ``length`` is nominal (the sampler decides how
    many items are read)."""

    def __init__(self, groups: Sequence[Sequence[TrainSource]], ratio=None, seed: int = 0, rank: int = 0,
                 length: int = 10 ** 9):
        self.groups = [list(g) for g in groups if len(g)]
        if not self.groups:
            raise DatasetError("no training data")
        sizes = np.array([sum(len(s) for s in g) for g in self.groups], dtype=np.float64)
        w = parse_ratio(ratio, len(groups)) if ratio is not None else None
        if w is not None:
            w = np.array([wi for wi, g in zip(w, groups) if len(g)])
            if w.sum() <= 0:
                raise DatasetError(f"mixing ratio {ratio!r} gives zero weight to every non-empty group")
            w = w / w.sum()
        self.group_probs = sizes / sizes.sum() if w is None else w
        self.seed, self.rank, self.length = int(seed), int(rank), int(length)

    def __len__(self):
        return self.length

    def rng(self, k: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.rank, int(k)])

    def __getitem__(self, k: int) -> dict:
        rng = self.rng(k)
        g = int(rng.choice(len(self.groups), p=self.group_probs))
        group = self.groups[g]
        sizes = np.array([len(s) for s in group], dtype=np.float64)
        s = int(rng.choice(len(group), p=sizes / sizes.sum())) if len(group) > 1 else 0
        image, label, i = group[s].draw(rng)
        return {"image": image, "label": label, "group": g, "source": s, "index": i}


class TargetSource:
    """Unlabelled training images (a domain-adaptation target) through a training pipeline.

    ``draw(rng)`` picks a file uniformly and returns (image (3, h, w), file index); the pipeline
    draws as for labelled data (resize ratio, crop box, flip, photometric distortion), with a void
    label carried along and no class-ratio check on the crop (``cat_max_ratio`` 1: there are no
    classes to check)."""

    def __init__(self, images: Sequence[str | os.PathLike], pipeline: TrainPipeline):
        if not images:
            raise DatasetError("no target images")
        self.images = [Path(p) for p in images]
        self.pipeline = replace(pipeline, cat_max_ratio=1.0)

    def __len__(self):
        return len(self.images)

    def draw(self, rng: np.random.Generator) -> tuple[torch.Tensor, int]:
        i = int(rng.integers(len(self.images)))
        image = load_image(self.images[i])
        img, _ = self.pipeline(image, np.full(image.shape[:2], IGNORE, dtype=np.uint8), rng)
        return img, i


class UDADataset(Dataset):
    """Training pairs for self-training: item k is item k of ``source`` (a ``MixedDataset`` of
    labelled data) plus ``target_image`` drawn with ``default_rng([seed, rank, k, 1])``: a target
    set by size, a file, the pipeline's draws. The target stream is separate, so the labelled half
    of item k equals the MixedDataset's item k, and the item stays a pure function of (seed, rank, k)."""

    def __init__(self, source: MixedDataset, targets: Sequence[TargetSource]):
        if not targets:
            raise DatasetError("no target data")
        self.source, self.targets = source, list(targets)
        sizes = np.array([len(t) for t in self.targets], dtype=np.float64)
        self.target_probs = sizes / sizes.sum()

    def __len__(self):
        return len(self.source)

    def __getitem__(self, k: int) -> dict:
        item = self.source[k]
        rng = np.random.default_rng([self.source.seed, self.source.rank, int(k), 1])
        t = int(rng.choice(len(self.targets), p=self.target_probs)) if len(self.targets) > 1 else 0
        image, i = self.targets[t].draw(rng)
        return {**item, "target_image": image, "target_source": t, "target_index": i}


class IndexStream(torch.utils.data.Sampler):
    """Item numbers start, start + 1, ... (``count`` of them): the sampler of a ``MixedDataset``."""

    def __init__(self, start: int, count: int):
        self.start, self.count = int(start), int(count)

    def __iter__(self):
        return iter(range(self.start, self.start + self.count))

    def __len__(self):
        return self.count
