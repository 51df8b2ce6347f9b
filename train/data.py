"""Datasets for the diffusion training scripts (U^S fine-tuning and ControlNet training).

Finding files: ``discover_pairs`` reads any layout of the one layout table,
``segmentation.datasets.LAYOUTS``, whose labels are trainId files (``gta``, ``cityscapes``,
``paired`` = ``folder``, ``jsonl`` = DGInStyle's ControlNet dataset file, ``dginstyle``, ...);
``--layout auto`` (``detect_layout``) picks ``jsonl`` for a .json/.jsonl file, ``cityscapes`` for
leftImg8bit/ + gtFine/ and ``gta`` for images/ + labels/ holding trainId files. Raw label ids are
refused with the ``segmentation.labels convert`` command that makes the trainId files.
``find_images`` lists every ``*.png/*.jpg`` under a folder (recursive) for U^S fine-tuning.
A ControlNet crop's caption is its class stack, as the original's, or a caption template
(``format_caption``) whose other fields come from the keys of a .jsonl dataset file's rows (a
per-image style word, say).

Sampling and randomness (what makes DDP and resume exact):
  ``ShardSampler`` is an infinite, index-based, rank-sharded sampler (DistributedSampler's split,
  one permutation per epoch from ``seed``) that yields keys ``(epoch, index)`` and can start at any
  position of its stream (resume: ``start = step * batch_size * grad_accum``). Each item draws
  *everything* random about itself (rare class and file, rescale ratio, crop, caption dropout, and a
  64-bit ``seed`` for its diffusion noise) from ``np.random.default_rng([seed, rank, epoch, index])``:
  ranks differ (the original's RCS draws were the same on every rank), and an item does not depend on the batch it lands in, on worker processes,
  or on what ran before it. ``diffusion_inputs`` turns the per-item seeds into per-item CPU torch
  generators for t ~ U{0..999}, ε and the VAE posterior sample, so gradient accumulation sees
  exactly the noise a large batch would.

Latent caching (``LatentCache``, ``fill_latent_cache``): the VAE posterior *moments* of a
deterministic pixel region of each item are stored once (keyed by file, size, mtime, region, ratio
and VAE fingerprint) and a fresh posterior sample is drawn from them every step, as without the
cache. It needs a single rescale ratio. With a centre crop the region is the crop itself. With
random or rare-class crops it is the whole image, trimmed to multiples of the VAE's downsampling
factor f, and each step slices its crop's latents out of it: the crop is drawn as without the cache
(same draws), then snapped down to the latent grid, so it moves by less than f pixels, and its
latents saw the pixels around the crop through the encoder's receptive field. With random flips a
second, mirrored entry holds the flipped region. Random rescales draw a new image each time, so the
datasets refuse a cache there. A whole-image entry costs more per pixel to encode than a crop (the
VAE's middle attention spans the whole latent), so it pays when each image is drawn many times: on the
miniature world's CPU recipe, U^P's steps became 17 % faster but filling the cache (4000 images, half of
them 256 x 128, and their mirrors) took as long as the saving over 4800 steps; the ControlNet stage
(2000 source images drawn 24 times each, their entries already written by the U^S stage) took
550 s instead of 607.
"""
from __future__ import annotations

import hashlib
import json
import os
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset, Sampler

from ldm.atomic import atomic_file
from ldm.vae import DiagonalGaussian
from mrlf.prompts import class_stack
from segmentation.datasets import LAYOUTS as DATASET_LAYOUTS
from segmentation.datasets import DatasetError, convert_command, find_pairs, read_dataset_file
from segmentation.labels import IGNORE, TRAIN_ID_SUFFIX, load_label
from segmentation.rcs import (DEFAULT_MIN_PIXELS, DEFAULT_TEMPERATURE, ClassStats, RareClassSampler, class_stats,
                              place_crop)

IMAGE_EXTS = (".png", ".jpg", ".jpeg")
# --layout: "auto" (detect_layout) or a layout of segmentation.datasets whose labels are trainId files
LAYOUTS = ("auto", "paired", *(name for name, lay in DATASET_LAYOUTS.items() if lay.converter is None))
DREAMBOOTH_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0)  # DGInStyle's U^S fine-tuning: random rescale before the crop
CITYSCAPES_RATIOS = (0.5, 0.75, 1.0, 1.25, 1.5)  # DGInStyle's ControlNet training on Cityscapes: resize ratios


# ---------------------------------------------------------------------------------------
# Finding files
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Pair:
    image: Path
    label: Path  # trainId label PNG (0..18, 255)
    text: str | None = None  # the dataset file's "text" (the full label's class stack; informational)
    fields: dict = field(default_factory=dict, compare=False)  # the dataset file row's keys (caption templates)


def find_images(root: str | os.PathLike) -> list[Path]:
    """Every ``*.png/*.jpg/*.jpeg`` under `root` (recursive, sorted), label files skipped."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: not a folder of images")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS
                   and not p.name.startswith(".")
                   and not p.name.endswith((TRAIN_ID_SUFFIX, "_labelIds.png", "_color.png", "_instanceIds.png")))
    if not files:
        raise DatasetError(f"{root}: no *.png / *.jpg images found (recursively)")
    return files


METADATA_FILE = "metadata.jsonl"


def find_captioned_images(root: str | os.PathLike, caption_column: str = "text") -> tuple[list[Path], list[str]]:
    """(files, captions) of an image folder with captions, as diffusers' text-to-image training reads one:
    ``ROOT/metadata.jsonl`` with one JSON object per line holding ``file_name`` (relative to ROOT) and the
    caption under `caption_column`. Every listed file must exist; other keys are ignored."""
    root = Path(root)
    meta = root / METADATA_FILE
    if not meta.is_file():
        raise DatasetError(f"{root}: no {METADATA_FILE} (lines {{\"file_name\": ..., \"{caption_column}\": ...}}); "
                           f"without captions, train with --prompt")
    files, captions = [], []
    for n, line in enumerate(meta.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            name, text = row["file_name"], row[caption_column]
        except (ValueError, KeyError, TypeError) as e:
            raise DatasetError(f"{meta}:{n}: needs \"file_name\" and \"{caption_column}\" ({e})") from e
        path = root / name
        if not path.is_file():
            raise DatasetError(f"{meta}:{n}: {path} does not exist")
        files.append(path)
        captions.append(str(text))
    if not files:
        raise DatasetError(f"{meta}: lists no images")
    return files, captions


def detect_layout(root: str | os.PathLike) -> str:
    """The layout ``--layout auto`` picks: a .json/.jsonl file is ``jsonl``; leftImg8bit/ + gtFine/ is
    ``cityscapes``; images/ + labels/ is ``gta`` when labels/ holds trainId files (raw GTA ids are
    refused with the command that converts them)."""
    root = Path(root)
    if root.is_file():
        if root.suffix in (".json", ".jsonl"):
            return "jsonl"
        raise DatasetError(f"{root}: a file, but not a .json/.jsonl dataset file")
    if not root.is_dir():
        raise DatasetError(f"{root}: no such folder or dataset file")
    if (root / "leftImg8bit").is_dir() and (root / "gtFine").is_dir():
        return "cityscapes"
    if (root / "images").is_dir() and (root / "labels").is_dir():
        if any((root / "labels").glob("*" + TRAIN_ID_SUFFIX)):
            return "gta"
        raise DatasetError(
            f"{root / 'labels'} holds no *{TRAIN_ID_SUFFIX} files. If these are raw GTA ids, convert them once "
            f"with:  {convert_command('gta', root / 'labels')}  ; if they already hold trainIds (0..18, 255), "
            f"pass --layout paired")
    raise DatasetError(f"{root}: unknown dataset layout; expected images/ + labels/ (gta, paired), "
                       f"leftImg8bit/ + gtFine/ (cityscapes), or a .jsonl dataset file")


def discover_pairs(root: str | os.PathLike, layout: str = "auto", split: str = "train") -> tuple[str, list[Pair]]:
    """(layout, pairs) of an image + trainId label dataset: ``segmentation.datasets.find_pairs`` in
    ``layout`` (``auto``: `detect_layout`), with the ``text`` of a jsonl dataset file kept."""
    if layout not in LAYOUTS:
        raise DatasetError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    if layout == "auto":
        layout = detect_layout(root)
    if layout == "jsonl":
        records = read_dataset_file(root)
        return layout, [Pair(Path(r["image_path"]), Path(r["label_path"]), r.get("text"), r) for r in records]
    return layout, [Pair(image, label) for image, label in find_pairs(root, layout, split)]


CLASSES_FIELD = "classes"  # a caption template's field for the crop's class stack


def template_fields(template: str) -> list[str]:
    """The ``{field}`` names of a caption template; a malformed one raises ``ValueError``."""
    try:
        names = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise ValueError(f"caption template {template!r}: {e}") from None
    bad = [f for f in names if not f.isidentifier()]
    if bad:
        raise ValueError(f"caption template {template!r}: fields must be plain names, got {bad}")
    return names


def check_caption_fields(template: str, pairs: Sequence[Pair], source: str) -> None:
    """Every field of `template` but {classes} must be a key of every pair's dataset-file row
    (`source` names the data in the error)."""
    needed = sorted(set(template_fields(template)) - {CLASSES_FIELD})
    for pair in pairs:
        missing = [f for f in needed if f not in pair.fields]
        if missing:
            has = f"its row has {sorted(pair.fields)}" if pair.fields else "only a .jsonl dataset file's rows have keys"
            raise DatasetError(f"{source}: the caption template {template!r} needs the key(s) {missing} for "
                               f"{pair.image}; {has}")


def format_caption(template: str, label: np.ndarray, fields: dict) -> str:
    """The caption of a label crop: `template` with {classes} = its class stack and the other fields from
    `fields`; "" for a crop without any class (as the bare class stack)."""
    classes = class_stack(label)
    return template.format(**{**fields, CLASSES_FIELD: classes}) if classes else ""


def pair_class_stats(pairs: Sequence[Pair], cache_dir: str | os.PathLike | None = None) -> ClassStats:
    """RCS statistics of exactly these labels, row i = pairs[i] (segmentation.rcs.class_stats per
    label folder, cached in `cache_dir`, or next to the labels when None)."""
    by_dir: dict[Path, list[int]] = {}
    for i, p in enumerate(pairs):
        by_dir.setdefault(p.label.parent, []).append(i)
    n = len(pairs)
    counts = np.zeros((n, 19), np.int64)
    void = np.zeros(n, np.int64)
    shapes = np.zeros((n, 2), np.int64)
    for folder, rows in by_dir.items():
        names = [pairs[i].label.name for i in rows]
        pattern = "*" + TRAIN_ID_SUFFIX if all(s.endswith(TRAIN_ID_SUFFIX) for s in names) else "*.png"
        cache = True
        if cache_dir is not None:
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
            tag = hashlib.sha1(str(folder.resolve()).encode()).hexdigest()[:12]
            cache = Path(cache_dir) / f"rcs_stats_{tag}.json"
        st = class_stats(folder, pattern=pattern, cache=cache)
        where = {f: j for j, f in enumerate(st.files)}
        for i, name in zip(rows, names):
            j = where[name]
            counts[i], void[i], shapes[i] = st.counts[j], st.void[j], st.shapes[j]
    root = Path(os.path.commonpath([str(p.label) for p in pairs])) if n > 1 else pairs[0].label.parent
    if root.is_file():
        root = root.parent
    files = [p.label.relative_to(root).as_posix() for p in pairs]
    return ClassStats(folder=root, files=files, counts=counts, void=void, shapes=shapes)


# ---------------------------------------------------------------------------------------
# Sampler and per-item randomness
# ---------------------------------------------------------------------------------------

class ShardSampler(Sampler):
    """Infinite stream of keys ``(epoch, index)`` for one rank.

    Epoch e is a permutation of range(n) (``np.random.default_rng([seed, e])``, or the identity
    without shuffling), padded by wrapping to a multiple of `world_size` and split rank::world,
    as torch's DistributedSampler does; the ranks' shares of an epoch are disjoint (up to the
    padding). Position p of this rank's stream is epoch p // ceil(n / world); ``start`` skips the
    first `start` keys (exact resume without replaying data).
    """

    def __init__(self, n: int, rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True,
                 start: int = 0):
        if n < 1:
            raise ValueError("ShardSampler needs a non-empty dataset")
        self.n, self.rank, self.world_size, self.seed, self.shuffle = n, rank, world_size, seed, shuffle
        self.start = int(start)
        self.per_rank = -(-n // world_size)

    def order(self, epoch: int) -> np.ndarray:
        idx = np.random.default_rng([self.seed, epoch]).permutation(self.n) if self.shuffle else np.arange(self.n)
        total = self.per_rank * self.world_size
        idx = np.resize(idx, total)  # wrap-around padding
        return idx[self.rank::self.world_size]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        pos, epoch, order = self.start, -1, None
        while True:
            e, k = divmod(pos, self.per_rank)
            if e != epoch:
                epoch, order = e, self.order(e)
            yield (int(epoch), int(order[k]))
            pos += 1


def _key(key, epoch: int) -> tuple[int, int]:
    if isinstance(key, (tuple, list)):
        return int(key[0]), int(key[1])
    return int(epoch), int(key)  # a plain index (torch's DistributedSampler): the dataset's set_epoch


def item_rng(seed: int, rank: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(rank), int(epoch), int(index)])


# ---------------------------------------------------------------------------------------
# Image helpers
# ---------------------------------------------------------------------------------------

def load_rgb(path: Path) -> Image.Image:
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        return im.convert("RGB")


def _scaled(size: tuple[int, int], ratio: float) -> tuple[int, int]:
    return max(1, int(round(size[0] * ratio))), max(1, int(round(size[1] * ratio)))


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> float (3, H, W) in [-1, 1] (ToTensor then Normalize(0.5, 0.5))."""
    image = np.asarray(image)
    t = torch.from_numpy(image if image.flags.writeable else image.copy())  # a PIL image's array is read-only
    return (t.permute(2, 0, 1).float() / 255.0 - 0.5) / 0.5


def pad_to(array: np.ndarray, size: int, value: int | None) -> np.ndarray:
    """Pad (H, W[, C]) at the bottom/right up to size x size: a constant `value`, or reflection when None."""
    h, w = array.shape[:2]
    ph, pw = max(0, size - h), max(0, size - w)
    if not ph and not pw:
        return array
    widths = [(0, ph), (0, pw)] + [(0, 0)] * (array.ndim - 2)
    if value is None:
        return np.pad(array, widths, mode="reflect" if min(h, w) > 1 else "edge")
    return np.pad(array, widths, mode="constant", constant_values=value)


def center_box(h: int, w: int, size: int) -> tuple[int, int]:
    return (w - size) // 2, (h - size) // 2


# ---------------------------------------------------------------------------------------
# Latent cache
# ---------------------------------------------------------------------------------------

@torch.no_grad()
def vae_fingerprint(vae: torch.nn.Module) -> str:
    """A short hash of a VAE's config and weights (cache entries of another VAE are never reused)."""
    h = hashlib.sha1(vae.cfg.to_json().encode())
    sums = torch.stack([torch.stack([p.double().sum(), p.double().square().sum()]) for p in vae.parameters()])
    h.update(sums.cpu().numpy().tobytes())
    return h.hexdigest()[:16]


class LatentCache:
    """VAE posterior moments (2·latent channels, h, w) per item region, in ``folder/vae-<fingerprint>/``;
    `factor` is the VAE's downsampling factor (latent pixel = factor x factor image pixels)."""

    def __init__(self, folder: str | os.PathLike, fingerprint: str, factor: int):
        self.dir = Path(folder) / f"vae-{fingerprint}"
        self.factor = int(factor)

    @classmethod
    def for_vae(cls, folder: str | os.PathLike, vae: torch.nn.Module) -> "LatentCache":
        return cls(folder, vae_fingerprint(vae), vae.cfg.downsample_factor)

    @staticmethod
    def key(path: Path, box: tuple[int, ...], resolution: int, ratio: float, mirrored: bool = False) -> str:
        st = Path(path).stat()
        s = f"{Path(path).resolve()}|{st.st_size}|{st.st_mtime_ns}|{box}|{resolution}|{ratio}"
        return hashlib.sha1((s + "|mirrored" if mirrored else s).encode()).hexdigest()

    def file(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.safetensors"

    def get(self, key: str) -> torch.Tensor | None:
        f = self.file(key)
        return load_file(str(f))["moments"] if f.is_file() else None

    def put(self, key: str, moments: torch.Tensor) -> None:
        with atomic_file(self.file(key)) as tmp:
            save_file({"moments": moments.detach().float().cpu().contiguous()}, str(tmp))


class _Cached:
    """Mixin for datasets whose items can read VAE moments from a LatentCache (see the module docstring).
    A dataset using it has ``resolution`` and ``crop`` and defines ``_source(index)`` (the image file and
    the one rescale ratio) and ``_padded(index)`` (that image rescaled and padded as its items are)."""

    cache: LatentCache | None = None
    epoch: int = 0
    mirrors: tuple[bool, ...] = (False,)  # the entries of an item: plain, and mirrored with random flips

    def set_epoch(self, epoch: int) -> None:
        """Epoch of plain integer keys (with torch's DistributedSampler; call next to its set_epoch, and
        without persistent workers, which keep their own copy). ShardSampler's keys carry their epoch."""
        self.epoch = int(epoch)

    def _check_cache(self, cache: LatentCache | None) -> None:
        if cache is not None and self.crop != "center" and self.resolution % cache.factor:
            raise ValueError(f"latent caching with {self.crop} crops needs a resolution that is a multiple of the "
                             f"VAE's factor {cache.factor}, got {self.resolution}")

    def _region(self, h: int, w: int) -> tuple[int, int, int, int]:
        """(x1, y1, x2, y2) of an entry in the padded (h, w) image: the centre crop, or the whole image
        trimmed to the latent grid."""
        if self.crop == "center":
            x1, y1 = center_box(h, w, self.resolution)
            return x1, y1, x1 + self.resolution, y1 + self.resolution
        f = self.cache.factor
        return 0, 0, w - w % f, h - h % f

    def cache_entries(self) -> list[tuple[int, bool]]:
        return [(i, m) for i in range(len(self)) for m in self.mirrors]

    def entry_view(self, index: int, mirrored: bool = False) -> torch.Tensor:
        """The pixels an entry encodes, (3, h, w) in [-1, 1]."""
        a = self._padded(index)
        x1, y1, x2, y2 = self._region(*a.shape[:2])
        x = to_tensor(a[y1:y2, x1:x2])
        return x.flip(-1) if mirrored else x

    def padded_size(self, index: int) -> tuple[int, int]:
        """(h, w) of an item's image at the cached ratio, padded to the resolution, from its header."""
        path, ratio = self._source(index)
        with Image.open(path) as im:
            w, h = _scaled(ImageOps.exif_transpose(im).size, ratio)
        return max(h, self.resolution), max(w, self.resolution)

    def cache_key(self, index: int, mirrored: bool = False) -> str:
        path, ratio = self._source(index)
        return LatentCache.key(path, self._region(*self.padded_size(index)), self.resolution, ratio, mirrored)

    def _snap(self, x1: int, y1: int) -> tuple[int, int]:
        """A crop origin on the latent grid of a whole-image entry (unchanged for centre entries)."""
        if self.crop == "center":
            return x1, y1
        f = self.cache.factor
        return x1 - x1 % f, y1 - y1 % f

    def _latents(self, index: int, x1: int, y1: int, mirrored: bool = False) -> torch.Tensor:
        """The moments of the crop at (x1, y1) (snapped), flipped when `mirrored`."""
        m = self.cache.get(self.cache_key(index, mirrored))
        if m is None:
            raise RuntimeError(f"latent cache {self.cache.dir} has no entry for item {index}"
                               f"{' (mirrored)' if mirrored else ''}; fill it first (fill_latent_cache)")
        if self.crop == "center":
            return m
        f, r = self.cache.factor, self.resolution
        if mirrored:  # the flipped crop is the mirrored image's crop at the mirrored origin
            x1 = m.shape[-1] * f - x1 - r
        return m[:, y1 // f:(y1 + r) // f, x1 // f:(x1 + r) // f]


@torch.no_grad()
def fill_latent_cache(dataset: _Cached, vae: torch.nn.Module, device, rank: int = 0, world_size: int = 1,
                      batch_size: int = 8, logger=None) -> int:
    """Encode this rank's share (every world_size-th) of the entries missing from the cache; returns the
    number written. A collective under torch.distributed: every rank calls it, and all wait until
    every share is written. Entries of one size are encoded together, `batch_size` at a time."""
    todo = [e for e in dataset.cache_entries()[rank::world_size] if dataset.cache.get(dataset.cache_key(*e)) is None]
    todo.sort(key=lambda e: dataset.padded_size(e[0]))  # whole-image entries: one size per batch
    dtype = next(vae.parameters()).dtype
    done, batch = 0, []

    def flush():
        nonlocal done
        post = vae.encode(torch.stack([x for _, x in batch]).to(device, dtype))
        for (entry, _), m in zip(batch, torch.cat([post.mean, post.logvar], dim=1).float()):
            dataset.cache.put(dataset.cache_key(*entry), m)
        done += len(batch)
        batch.clear()
        if logger is not None and (done // batch_size) % 50 == 0:
            logger.info(f"latent cache: {done}/{len(todo)} encoded on rank {rank}")

    for entry in todo:
        x = dataset.entry_view(*entry)
        if batch and (len(batch) == batch_size or batch[0][1].shape != x.shape):
            flush()
        batch.append((entry, x))
    if batch:
        flush()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    if logger is not None:
        logger.info(f"latent cache {dataset.cache.dir}: {len(todo)} new entries on rank {rank}")
    return len(todo)


def shard_loader(dataset: Dataset, batch_size: int, rank: int, world_size: int, seed: int, start: int,
                 num_workers: int, pin_memory: bool) -> DataLoader:
    """``batch_size`` items at a time from this rank's `ShardSampler` stream, from position ``start``
    on (a resumed run's first unseen item). The loader's own generator keeps the global RNG untouched."""
    sampler = ShardSampler(len(dataset), rank, world_size, seed=seed, start=start)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, pin_memory=pin_memory,
                      generator=torch.Generator(), persistent_workers=num_workers > 0)


# ---------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------

class ImageDataset(_Cached, Dataset):
    """Images for U-Net training (DGInStyle's DreamBooth data, or captioned images for a text-to-image
    prior) and for the autoencoder: rescale by a random ratio from `scales` (bilinear), pad by reflection
    if smaller than `resolution`, then a random (or centre) square crop; with `flip`, a horizontal flip
    with probability 1/2. Items: pixel_values (3, R, R) in [-1, 1], caption (`captions[i]` when given,
    else the instance prompt `caption`, "" for DGInStyle; replaced by "" with probability
    `proportion_empty`), seed (int64, for the diffusion noise), desc ("file@ratio,x1,y1", for logs)."""

    def __init__(self, files: Sequence[Path], resolution: int = 512, scales: Sequence[float] = DREAMBOOTH_SCALES,
                 crop: str = "random", caption: str = "", seed: int = 0, rank: int = 0,
                 cache: LatentCache | None = None, captions: Sequence[str] | None = None,
                 proportion_empty: float = 0.0, flip: bool = False):
        if crop not in ("random", "center"):
            raise ValueError(f"crop must be 'random' or 'center', got {crop!r}")
        if not files:
            raise DatasetError("ImageDataset: no image files")
        self.files, self.resolution, self.scales = list(files), int(resolution), tuple(float(s) for s in scales)
        if not self.scales or min(self.scales) <= 0:
            raise ValueError(f"scales must be positive, got {scales}")
        if captions is not None and len(captions) != len(self.files):
            raise ValueError(f"{len(captions)} captions for {len(self.files)} images")
        if not 0.0 <= proportion_empty <= 1.0:
            raise ValueError(f"proportion_empty must be in [0, 1], got {proportion_empty}")
        self.crop, self.caption, self.seed, self.rank = crop, caption, int(seed), int(rank)
        self.captions = None if captions is None else list(captions)
        self.proportion_empty, self.flip = float(proportion_empty), bool(flip)
        if cache is not None and len(self.scales) != 1:
            raise ValueError(f"latent caching needs a single scale (got scales={self.scales})")
        self._check_cache(cache)
        self.cache = cache
        self.mirrors = (False, True) if flip else (False,)

    def __len__(self) -> int:
        return len(self.files)

    def _source(self, index: int) -> tuple[Path, float]:
        return self.files[index], self.scales[0]

    def _padded(self, index: int, ratio: float | None = None) -> np.ndarray:
        im = load_rgb(self.files[index])
        ratio = self.scales[0] if ratio is None else ratio
        if ratio != 1.0:
            im = im.resize(_scaled(im.size, ratio), Image.BILINEAR)
        return pad_to(np.asarray(im), self.resolution, None)

    def _origin(self, h: int, w: int, rng: np.random.Generator | None) -> tuple[int, int]:
        r = self.resolution
        if self.crop == "center":
            return center_box(h, w, r)
        return int(rng.integers(0, w - r + 1)), int(rng.integers(0, h - r + 1))

    def _view(self, index: int, rng: np.random.Generator | None):
        ratio = self.scales[0] if len(self.scales) == 1 else float(rng.choice(self.scales))
        a = self._padded(index, ratio)
        x1, y1 = self._origin(*a.shape[:2], rng)
        r = self.resolution
        return a[y1:y1 + r, x1:x1 + r], ratio, (x1, y1)

    def view(self, index: int) -> torch.Tensor:
        """The centre crop of an item (crop='center')."""
        return to_tensor(self._view(index, None)[0])

    def __getitem__(self, key) -> dict:
        epoch, index = _key(key, self.epoch)
        rng = item_rng(self.seed, self.rank, epoch, index)
        item = {"caption": self.caption if self.captions is None else self.captions[index]}
        if self.cache is not None:  # the crop drawn as without the cache, from the image's size alone
            ratio = self.scales[0]
            x1, y1 = self._snap(*self._origin(*self.padded_size(index), rng))
        else:
            crop, ratio, (x1, y1) = self._view(index, rng)
            item["pixel_values"] = to_tensor(crop)
        item["seed"] = int(rng.integers(2**63 - 1))
        # Drawn after everything above, and only when enabled, so the draws of other items stay as they were.
        flipped = self.flip and rng.random() < 0.5
        if self.cache is not None:
            item["moments"] = self._latents(index, x1, y1, flipped)
        elif flipped:
            item["pixel_values"] = item["pixel_values"].flip(-1)
        if self.proportion_empty and rng.random() < self.proportion_empty:
            item["caption"] = ""
        item["desc"] = f"{self.files[index].name}@{ratio:g},{x1},{y1}"
        return item


class ControlNetDataset(_Cached, Dataset):
    """(image, trainId label) crops for ControlNet training (DGInStyle's GTADataset, with its RCS).

    Per item, in this order, from ``item_rng(seed, rank, epoch, index)``:
      1. crop="rcs": (class c, file) from the RareClassSampler (the index only seeds the draw);
         otherwise file = pairs[index];
      2. the resize ratio (``rng.choice(resize_ratios)``, only when there are several): image
         bilinear, label nearest (Cityscapes recipe);
      3. images smaller than the resolution are padded (image by reflection, label with 255);
      4. the crop: rcs -> ``place_crop`` around a random pixel of c (``rcs_tries`` = 1 is the
         original's single try with no pixel check; more tries re-draw until the crop holds more than
         ``rcs_min_crop_ratio`` of its area in class c); random -> uniform; center -> fixed;
      5. caption dropout: ``rng.random() < proportion_empty_prompts`` -> "" (always drawn);
      6. the 64-bit noise seed.
    Items: pixel_values (3, R, R) in [-1, 1] (or moments from the cache), label (R, R) uint8 trainIds
    (void 255; one-hot on the device, 20 channels), caption (``caption_template`` formatted by
    `format_caption`: the original's is the crop's class stack, "{classes}"; or ""), seed,
    desc ("file@x1,y1[#c]").
    """

    def __init__(self, pairs: Sequence[Pair], resolution: int = 512, crop: str = "rcs", *, seed: int = 0,
                 rank: int = 0, stats: ClassStats | None = None, rcs_temperature: float = DEFAULT_TEMPERATURE,
                 rcs_min_pixels: int = DEFAULT_MIN_PIXELS, rcs_tries: int = 1, rcs_min_crop_ratio: float = 0.01,
                 resize_ratios: Sequence[float] = (1.0,), proportion_empty_prompts: float = 0.0,
                 cache: LatentCache | None = None, caption_template: str = "{" + CLASSES_FIELD + "}"):
        if crop not in ("rcs", "random", "center"):
            raise ValueError(f"crop must be 'rcs', 'random' or 'center', got {crop!r}")
        if not 0.0 <= proportion_empty_prompts <= 1.0:
            raise ValueError(f"proportion_empty_prompts must be in [0, 1], got {proportion_empty_prompts}")
        if not pairs:
            raise DatasetError("ControlNetDataset: no (image, label) pairs")
        self.pairs, self.resolution, self.crop = list(pairs), int(resolution), crop
        self.seed, self.rank = int(seed), int(rank)
        self.ratios = tuple(float(r) for r in resize_ratios)
        if not self.ratios or min(self.ratios) <= 0:
            raise ValueError(f"resize ratios must be positive, got {resize_ratios}")
        self.p_empty = float(proportion_empty_prompts)
        check_caption_fields(caption_template, self.pairs, "ControlNetDataset")
        self.caption_template = caption_template
        self.rcs_tries, self.rcs_min_crop_ratio = int(rcs_tries), float(rcs_min_crop_ratio)
        self.sampler = None
        if crop == "rcs":
            if stats is None:
                raise ValueError("crop='rcs' needs the label statistics (pair_class_stats)")
            if len(stats.files) != len(self.pairs):
                raise ValueError(f"statistics of {len(stats.files)} labels for {len(self.pairs)} pairs")
            self.sampler = RareClassSampler(stats, rcs_temperature, rcs_min_pixels)
        if cache is not None and len(self.ratios) != 1:
            raise ValueError(f"latent caching needs a single resize ratio (got ratios={self.ratios})")
        self._check_cache(cache)
        self.cache = cache

    def __len__(self) -> int:
        return len(self.pairs)

    def _load(self, i: int, ratio: float) -> tuple[np.ndarray, np.ndarray]:
        pair = self.pairs[i]
        label = load_label(pair.label)
        image = load_rgb(pair.image)
        if image.size != (label.shape[1], label.shape[0]):
            raise DatasetError(f"{pair.image} is {image.size[0]}x{image.size[1]} but its label {pair.label} is "
                              f"{label.shape[1]}x{label.shape[0]} (WxH)")
        if ratio != 1.0:
            size = _scaled(image.size, ratio)
            image = image.resize(size, Image.BILINEAR)
            label = np.asarray(Image.fromarray(label).resize(size, Image.NEAREST))
        r = self.resolution
        return pad_to(np.asarray(image), r, None), pad_to(label, r, IGNORE)

    def _source(self, index: int) -> tuple[Path, float]:
        return self.pairs[index].image, self.ratios[0]

    def _padded(self, index: int) -> np.ndarray:
        return self._load(index, self.ratios[0])[0]

    def __getitem__(self, key) -> dict:
        epoch, index = _key(key, self.epoch)
        rng = item_rng(self.seed, self.rank, epoch, index)
        c = None
        if self.sampler is not None:
            c, index = self.sampler.sample(rng)
        ratio = self.ratios[0] if len(self.ratios) == 1 else float(rng.choice(self.ratios))
        image, label = self._load(index, ratio)
        h, w = label.shape
        r = self.resolution
        if self.crop == "rcs" and np.any(label == c):
            x1, y1, _, _ = place_crop(label, c, rng, r, min_ratio=self.rcs_min_crop_ratio, max_tries=self.rcs_tries,
                                      source=str(self.pairs[index].label)).box
        elif self.crop == "center":
            x1, y1 = center_box(h, w, r)
        else:  # random, or RCS whose class vanished in a downscale
            x1, y1 = int(rng.integers(0, w - r + 1)), int(rng.integers(0, h - r + 1))
        if self.cache is not None:
            x1, y1 = self._snap(x1, y1)
        label = np.ascontiguousarray(label[y1:y1 + r, x1:x1 + r])
        drop = rng.random() < self.p_empty
        caption = "" if drop else format_caption(self.caption_template, label, self.pairs[index].fields)
        item = {"label": torch.from_numpy(label), "caption": caption}
        if self.cache is not None:
            item["moments"] = self._latents(index, x1, y1)
        else:
            item["pixel_values"] = to_tensor(image[y1:y1 + r, x1:x1 + r])
        item["seed"] = int(rng.integers(2**63 - 1))
        item["desc"] = f"{self.pairs[index].label.name}@{x1},{y1}" + (f"#{c}" if c is not None else "")
        return item


# ---------------------------------------------------------------------------------------
# Batches -> diffusion training inputs
# ---------------------------------------------------------------------------------------

def diffusion_inputs(batch: dict, vae: torch.nn.Module, device, num_train_timesteps: int = 1000,
                     scaling_factor: float | None = None, noise_offset: float = 0.0):
    """(z0, noise, t) for a batch: scaled latents of a VAE posterior *sample* (as the original),
    ε ~ N(0, I) and t ~ U{0..N-1}, all drawn per item from ``torch.Generator().manual_seed(seed)``
    on the CPU (t, then ε, then the posterior noise, then the offset) and moved to `device`.

    `noise_offset` > 0 adds ``noise_offset * N(0, 1)`` per item and channel, constant over the image
    ("offset noise", diffusers' ``--noise_offset``). SD's schedule never reaches pure noise (√ᾱ_999 ≈
    0.07), so a model trained without it reads an image's overall colour off the start noise's mean at
    sampling time instead of choosing it from the prompt."""
    gens = [torch.Generator().manual_seed(int(s)) for s in batch["seed"]]
    t = torch.cat([torch.randint(0, num_train_timesteps, (1,), generator=g) for g in gens]).to(device)
    with torch.no_grad():
        if "moments" in batch:
            posterior = DiagonalGaussian(batch["moments"].to(device, torch.float32))
        else:
            dtype = next(vae.parameters()).dtype
            posterior = vae.encode(batch["pixel_values"].to(device, dtype))
        shape = posterior.mean.shape[1:]
        noise = torch.cat([torch.randn((1, *shape), generator=g) for g in gens]).to(device)
        z0 = posterior.sample(gens).float() * (scaling_factor or vae.cfg.scaling_factor)
        if noise_offset:
            offset = torch.cat([torch.randn((1, shape[0], 1, 1), generator=g) for g in gens]).to(device)
            noise = noise + noise_offset * offset
    return z0, noise, t
