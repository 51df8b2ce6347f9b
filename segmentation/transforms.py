"""The mmseg training / test pipelines of DGInStyle-SegModel, on numpy arrays, seeded by argument.

Training (SegModel's GTA configs): ``Resize`` (keep ratio, fit ``scale`` = (long, short)
edges, e.g. (1280, 720)) -> ``RandomCrop`` 512 with ``cat_max_ratio`` 0.75 (up to 10 re-draws) ->
``RandomFlip`` 0.5 -> ``PhotoMetricDistortion`` (brightness +-32, contrast 0.5-1.5, saturation
0.5-1.5, hue +-18 on OpenCV's 0..180 scale) -> ``Normalize`` (ImageNet mean/std, RGB) -> ``Pad``
to the crop size (image 0 after normalisation, label 255). The generated-data branch is the same
with ``scale=None`` (no resize; the crop is a no-op on 512^2 images).

Images are RGB uint8 (H, W, 3), labels uint8 (H, W) trainIds with 255 for void. Every random draw
comes from the ``np.random.Generator`` passed in, in a fixed order, so a sample is a function of
its seed. Differences from mmcv (documented, not bugs): resizes use ``torch.nn.functional.
interpolate`` (bilinear, half-pixel centres, no antialias: cv2's INTER_LINEAR; nearest for
labels), and HSV is computed in float rather than OpenCV's uint8 HSV, then re-quantised.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .labels import IGNORE

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


def _pair(size) -> tuple[int, int]:
    """An int or (h, w) -> (h, w)."""
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    h, w = size
    return int(h), int(w)


# --------------------------------------------------------------------------------------------
# Resize
# --------------------------------------------------------------------------------------------
def rescale_size(hw: tuple[int, int], scale: tuple[int, int], ratio: float = 1.0) -> tuple[int, int]:
    """mmcv ``rescale_size`` with keep_ratio: the largest factor that fits the long edge in
    max(scale) and the short edge in min(scale) (times ``ratio``). Returns (new_h, new_w)."""
    h, w = hw
    long_edge, short_edge = max(scale) * ratio, min(scale) * ratio
    f = min(long_edge / max(h, w), short_edge / min(h, w))
    return int(h * f + 0.5), int(w * f + 0.5)


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a uint8 (H, W, 3) image to ``size`` = (h, w)."""
    if image.shape[:2] == tuple(size):
        return image
    t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
    t = F.interpolate(t, size=size, mode="bilinear", align_corners=False)
    return t[0].permute(1, 2, 0).round_().clamp_(0, 255).to(torch.uint8).numpy()


def resize_label(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a (H, W) label (src index = floor(dst * in/out), like cv2)."""
    if label.shape[:2] == tuple(size):
        return label
    t = torch.from_numpy(np.ascontiguousarray(label))[None, None]
    return F.interpolate(t, size=size, mode="nearest")[0, 0].numpy()


def resize(image, label, scale, ratio: float = 1.0):
    size = rescale_size(image.shape[:2], scale, ratio)
    return resize_image(image, size), (None if label is None else resize_label(label, size))


# --------------------------------------------------------------------------------------------
# Crop, flip, pad
# --------------------------------------------------------------------------------------------
def crop_box(hw, crop, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """A uniform crop (y1, y2, x1, x2) of at most ``crop`` = (h, w) inside an image of size ``hw``."""
    (h, w), (ch, cw) = hw, crop
    y1 = int(rng.integers(0, max(h - ch, 0) + 1))
    x1 = int(rng.integers(0, max(w - cw, 0) + 1))
    return y1, min(y1 + ch, h), x1, min(x1 + cw, w)


def random_crop(image, label, crop, rng: np.random.Generator, cat_max_ratio: float = 0.75,
                ignore_index: int = IGNORE, tries: int = 10):
    """mmseg ``RandomCrop``: draw a box; if ``cat_max_ratio`` < 1, re-draw (up to ``tries`` times)
    while the crop's most frequent class (ignoring void) covers ``>= cat_max_ratio`` of its
    labelled pixels or it holds a single class. After ``tries`` failures the last draw is used
    unchecked, as in mmseg."""
    crop = _pair(crop)
    h, w = image.shape[:2]
    if h <= crop[0] and w <= crop[1]:  # nothing to choose (e.g. 512^2 generated data): no draws
        return image, label
    box = crop_box((h, w), crop, rng)
    if cat_max_ratio < 1.0:
        for _ in range(tries):
            y1, y2, x1, x2 = box
            cnt = np.bincount(label[y1:y2, x1:x2].ravel(), minlength=256)
            cnt = np.delete(cnt, ignore_index)
            cnt = cnt[cnt > 0]
            if len(cnt) > 1 and cnt.max() / cnt.sum() < cat_max_ratio:
                break
            box = crop_box(image.shape[:2], crop, rng)
    y1, y2, x1, x2 = box
    return image[y1:y2, x1:x2], label[y1:y2, x1:x2]


def random_flip(image, label, rng: np.random.Generator, prob: float = 0.5):
    if rng.random() < prob:
        return image[:, ::-1], label[:, ::-1]
    return image, label


def pad_to(image: torch.Tensor, label: torch.Tensor, size, image_value: float = 0.0, label_value: int = IGNORE):
    """Pad bottom/right to at least ``size`` = (h, w): (3, H, W) image, (H, W) label."""
    h, w = _pair(size)
    ph, pw = max(h - image.shape[-2], 0), max(w - image.shape[-1], 0)
    if ph or pw:
        image = F.pad(image, (0, pw, 0, ph), value=image_value)
        label = F.pad(label, (0, pw, 0, ph), value=label_value)
    return image, label


# --------------------------------------------------------------------------------------------
# Photometric distortion
# --------------------------------------------------------------------------------------------
def _to_u8(x: np.ndarray) -> np.ndarray:
    return np.clip(x, 0, 255).astype(np.uint8)  # truncation, like mmseg's convert()


def rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    """float (..., 3) RGB in [0, 255] -> H in degrees [0, 360), S in [0, 1], V in [0, 255]."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    v = rgb.max(-1)
    c = v - rgb.min(-1)
    s = np.where(v > 0, c / np.maximum(v, 1e-12), 0.0)
    cz = np.maximum(c, 1e-12)
    h = np.where(v == r, (g - b) / cz, np.where(v == g, 2.0 + (b - r) / cz, 4.0 + (r - g) / cz))
    h = np.where(c > 0, (h * 60.0) % 360.0, 0.0)
    return np.stack([h, s, v], -1)


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    k = lambda n: (n + h / 60.0) % 6  # noqa: E731
    f = lambda n: v - v * s * np.clip(np.minimum(k(n), 4 - k(n)), 0, 1)  # noqa: E731
    return np.stack([f(5), f(3), f(1)], -1)


def photometric_distortion(image: np.ndarray, rng: np.random.Generator, brightness_delta: float = 32,
                           contrast_range=(0.5, 1.5), saturation_range=(0.5, 1.5), hue_delta: int = 18) -> np.ndarray:
    """mmseg ``PhotoMetricDistortion``; each step applies with probability 1/2. Draw order:
    brightness (coin, delta), mode (contrast first or last), [contrast], saturation, hue, [contrast].
    Hue deltas are on OpenCV's 0..180 scale (x2 degrees)."""
    img = image
    if rng.integers(2):
        img = _to_u8(img.astype(np.float32) + rng.uniform(-brightness_delta, brightness_delta))
    contrast_first = rng.integers(2) == 1

    def contrast(x):
        if rng.integers(2):
            x = _to_u8(x.astype(np.float32) * rng.uniform(*contrast_range))
        return x

    if contrast_first:
        img = contrast(img)
    if rng.integers(2):
        hsv = rgb_to_hsv(img.astype(np.float32))
        hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(*saturation_range), 0, 1)
        img = _to_u8(np.round(hsv_to_rgb(hsv)))
    if rng.integers(2):
        hsv = rgb_to_hsv(img.astype(np.float32))
        hsv[..., 0] = (hsv[..., 0] + 2.0 * int(rng.integers(-hue_delta, hue_delta))) % 360.0
        img = _to_u8(np.round(hsv_to_rgb(hsv)))
    if not contrast_first:
        img = contrast(img)
    return img


# --------------------------------------------------------------------------------------------
# Normalisation and pipelines
# --------------------------------------------------------------------------------------------
def normalize(image: np.ndarray, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """uint8 RGB (H, W, 3) -> float32 (3, H, W), (x - mean) / std."""
    t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()
    return (t - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def denormalize(image: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
    """Inverse of ``normalize`` for one (3, H, W) tensor -> uint8 (H, W, 3)."""
    t = image.detach().cpu().float() * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    return t.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


@dataclass(frozen=True)
class TrainPipeline:
    """Geometric part (``geometric``: resize, crop) and appearance part (``finish``: flip,
    photometric distortion, normalise, pad), split so rare-class sampling can re-crop one file."""

    scale: tuple[int, int] | None = (1280, 720)  # None: no resize (generated 512^2 data)
    ratio_range: tuple[float, float] | None = None  # random rescale factor (mmseg ratio_range)
    crop: int | tuple[int, int] = 512
    cat_max_ratio: float = 0.75
    flip_prob: float = 0.5
    photometric: bool = True
    mean: Sequence[float] = IMAGENET_MEAN
    std: Sequence[float] = IMAGENET_STD

    def resize(self, image, label, rng: np.random.Generator):
        if self.scale is None:
            return image, label
        ratio = 1.0 if self.ratio_range is None else float(rng.uniform(*self.ratio_range))
        return resize(image, label, self.scale, ratio)

    def take_crop(self, image, label, rng: np.random.Generator):
        return random_crop(image, label, self.crop, rng, self.cat_max_ratio)

    def geometric(self, image, label, rng: np.random.Generator):
        image, label = self.resize(image, label, rng)
        return self.take_crop(image, label, rng)

    def finish(self, image, label, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = random_flip(image, label, rng, self.flip_prob)
        if self.photometric:
            image = photometric_distortion(np.ascontiguousarray(image), rng)
        img = normalize(image, self.mean, self.std)
        lab = torch.from_numpy(np.ascontiguousarray(label)).long()
        return pad_to(img, lab, self.crop)

    def __call__(self, image, label, rng: np.random.Generator):
        image, label = self.geometric(image, label, rng)
        return self.finish(image, label, rng)


@dataclass(frozen=True)
class TestPipeline:
    """Resize the image (keep ratio) to the test ``scale`` and normalise; the label stays at its
    original size (predictions are resized back to it, as mmseg does)."""

    scale: tuple[int, int] | None = (1024, 512)
    mean: Sequence[float] = IMAGENET_MEAN
    std: Sequence[float] = IMAGENET_STD

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        if self.scale is not None:
            image = resize_image(image, rescale_size(image.shape[:2], self.scale))
        return normalize(image, self.mean, self.std)
