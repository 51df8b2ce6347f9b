"""Self-training for unsupervised domain adaptation as MIC (Hoyer et al., CVPR 2023) runs it on
DAFormer / HRDA (DACS self-training + masked image consistency): the pieces that
``train/train_uda.py`` puts together, one function or small class each.

One iteration, on a labelled source batch (x_s, y_s) and an unlabelled target batch x_t:

    teacher.update(student, step)                 # step 0: a copy; then EMA, alpha = min(1 - 1/(t+1), 0.999)
    y_t, w_t = pseudo_labels(teacher(x_t))        # arg-max, weight = share of pixels with p_max >= 0.968
    m = class_mix_masks(y_s)                      # DACS ClassMix: half the source classes, per image
    x_m, y_m, w_m = mix(m, x_s, x_t), mix(m, y_s, y_t), mix(m, 1, w_t)
    x_m = strong(x_m)                             # colour jitter 0.2 (p 0.8), Gaussian blur sigma 0.15-1.15 (p 0.5)
    x_k = strong(x_t) * block_mask(x_t)           # MIC: 64-px blocks, 70 % masked
    loss = CE(x_s, y_s) + CE_w(x_m, y_m, w_m) + lambda * CE_w(x_k, y_t, w_t)

Every random draw comes from the ``torch.Generator`` passed in (the CPU one by default), in the
order each docstring states, so a run is reproducible and resumes exactly. Images are normalised
(ImageNet mean / std, as the data pipelines make them) NCHW tensors; labels (B, H, W) integers
with 255 for void.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .models.mit import Block
from .transforms import IMAGENET_MEAN, IMAGENET_STD

# MIC's defaults (its gtaHR2csHR_mic_hrda config on DAFormer's dacs_a999_fdthings)
ALPHA = 0.999  # EMA teacher
PSEUDO_THRESHOLD = 0.968  # confidence that counts a pseudo-labelled pixel in the weight
MASK_BLOCK = 64  # MIC block size (pixels)
MASK_RATIO = 0.7  # share of blocks masked


# --------------------------------------------------------------------------------------------
# EMA teacher and pseudo-labels
# --------------------------------------------------------------------------------------------
def ema_alpha(step: int, alpha: float = ALPHA) -> float:
    """The teacher's EMA coefficient before iteration ``step`` (>= 1): min(1 - 1/(step + 1), alpha),
    so the teacher follows the student quickly at first (0.5, 0.667, ...) and slowly later."""
    return min(1.0 - 1.0 / (step + 1), alpha)


def without_stochastic_layers(model: nn.Module) -> nn.Module:
    """Switch dropout and stochastic depth (MiT blocks) to inference behaviour, leaving every other
    module in its mode: the teacher predicts in training mode (batch-norm on batch statistics, as
    MIC's teacher does) but without random drops."""
    for m in model.modules():
        if isinstance(m, (nn.modules.dropout._DropoutNd, Block)):
            m.training = False
    return model


class EMATeacher:
    """A copy of the student whose parameters follow the student's by an exponential moving average.

    Only parameters are averaged; buffers (batch-norm statistics) stay the teacher's own, as MIC's
    teacher keeps them. ``update(student, step)`` before iteration ``step``: at step 0 the teacher
    takes the student's parameters, afterwards teacher <- a * teacher + (1 - a) * student with
    a = ``ema_alpha(step, alpha)``. Calling the teacher gives its logits at the input size, without
    gradients, from its training-mode forward with dropout and drop-path off (for HRDA: context plus
    sliding-window detail inference, the multi-resolution pseudo-labels)."""

    def __init__(self, student: nn.Module, alpha: float = ALPHA):
        self.model = copy.deepcopy(student).requires_grad_(False)
        self.alpha = float(alpha)

    @torch.no_grad()
    def update(self, student: nn.Module, step: int) -> None:
        pairs = zip(self.model.parameters(), student.parameters(), strict=True)
        if step == 0:
            for t, s in pairs:
                t.copy_(s)
            return
        a = ema_alpha(step, self.alpha)
        for t, s in pairs:
            t.mul_(a).add_(s.detach().to(t.dtype), alpha=1.0 - a)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        without_stochastic_layers(self.model.train())
        return self.model(images)

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)


@torch.no_grad()
def pseudo_labels(logits: torch.Tensor, threshold: float = PSEUDO_THRESHOLD) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels (B, H, W) long, weight (B, H, W) float) from teacher logits (B, C, H, W).

    The label is the arg-max; the weight of every pixel is one number, the share of the batch's
    pixels whose softmax maximum is >= ``threshold`` (DACS's quality estimate)."""
    prob, label = torch.softmax(logits.float(), dim=1).max(dim=1)
    share = (prob >= threshold).float().mean()
    return label, share * torch.ones_like(prob)


# --------------------------------------------------------------------------------------------
# ClassMix
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def class_mix_masks(labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """DACS's ClassMix masks (B, 1, H, W) bool, True where the source pixel is pasted.

    The classes are the values present in the whole source batch (void 255 included when present,
    as DACS takes them); for each image in turn ceil(n / 2) of the n classes are drawn without
    replacement (the first of a ``torch.randperm(n)``) and the mask is where that image's label
    holds one of them."""
    classes = torch.unique(labels)
    n = classes.numel()
    masks = []
    for label in labels:
        chosen = classes[torch.randperm(n, generator=generator)[: (n + 1) // 2].to(classes.device)]
        masks.append(torch.isin(label, chosen))
    return torch.stack(masks)[:, None]


def mix(mask: torch.Tensor, source: torch.Tensor | float, target: torch.Tensor) -> torch.Tensor:
    """mask * source + (1 - mask) * target for a (B, 1, H, W) boolean mask: images (B, C, H, W)
    take it as is, labels and weights (B, H, W) its channel squeezed; ``source`` may be a number
    (a source pixel's weight, 1)."""
    m = mask if target.dim() == 4 else mask[:, 0]
    source = torch.as_tensor(source, dtype=target.dtype, device=target.device)
    return torch.where(m, source, target)


# --------------------------------------------------------------------------------------------
# Strong augmentation
# --------------------------------------------------------------------------------------------
def _rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB in [0, 1] -> H as a fraction of a turn [0, 1), S, V."""
    r, g, b = x.unbind(1)
    v, _ = x.max(1)
    c = v - x.min(1).values
    cz = torch.where(c > 0, c, torch.ones_like(c))
    h = torch.where(v == r, (g - b) / cz, torch.where(v == g, 2.0 + (b - r) / cz, 4.0 + (r - g) / cz))
    h = torch.where(c > 0, (h / 6.0) % 1.0, torch.zeros_like(h))
    s = torch.where(v > 0, c / torch.where(v > 0, v, torch.ones_like(v)), torch.zeros_like(v))
    return torch.stack([h, s, v], 1)


def _hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    h, s, v = x.unbind(1)

    def f(n):
        k = (n + h * 6.0) % 6.0
        return v - v * s * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0)

    return torch.stack([f(5.0), f(3.0), f(1.0)], 1)


def color_jitter(x: torch.Tensor, brightness: torch.Tensor, contrast: torch.Tensor, saturation: torch.Tensor,
                 hue: torch.Tensor, order) -> torch.Tensor:
    """Colour jitter of (B, 3, H, W) images in [0, 1] with per-image factors (B,), in ``order``
    (0 brightness, 1 contrast, 2 saturation, 3 hue), each result clamped to [0, 1]: brightness adds
    (factor - 1), contrast multiplies, saturation scales S in HSV, hue turns H by the factor (a
    fraction of a full turn). These are the operations of kornia 0.5's ColorJitter, which MIC uses."""
    def per_image(t):
        return t.to(x.device, x.dtype).view(-1, 1, 1, 1)

    for op in order:
        if op == 0:
            x = (x + per_image(brightness) - 1.0).clamp(0.0, 1.0)
        elif op == 1:
            x = (x * per_image(contrast)).clamp(0.0, 1.0)
        else:
            hsv = _rgb_to_hsv(x)
            if op == 2:
                hsv[:, 1] = (hsv[:, 1] * per_image(saturation)[:, 0]).clamp(0.0, 1.0)
            else:
                hsv[:, 0] = (hsv[:, 0] + per_image(hue)[:, 0]) % 1.0
            x = _hsv_to_rgb(hsv).clamp(0.0, 1.0)
    return x


def blur_kernel_size(n: int) -> int:
    """DACS's blur kernel along an axis of n pixels: c = ceil(0.1 n), made odd by subtracting 1."""
    c = math.ceil(0.1 * n)
    return c if c % 2 else c - 1


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, H, W) with DACS's kernel sizes (`blur_kernel_size` of H
    and of W) and reflected borders (kornia's GaussianBlur2d, which DACS uses)."""
    out = x
    for dim, n in ((2, x.shape[2]), (3, x.shape[3])):
        k = blur_kernel_size(n)
        if k < 2:
            continue
        t = torch.arange(k, dtype=torch.float64) - (k - 1) / 2
        w = torch.exp(-t ** 2 / (2 * sigma ** 2))
        w = (w / w.sum()).to(x.device, x.dtype)
        shape = (1, 1, k, 1) if dim == 2 else (1, 1, 1, k)
        pad = (0, 0, k // 2, k // 2) if dim == 2 else (k // 2, k // 2, 0, 0)
        c = out.shape[1]
        out = F.conv2d(F.pad(out, pad, mode="reflect"), w.view(shape).expand(c, 1, *shape[2:]), groups=c)
    return out


@dataclass(frozen=True)
class StrongAugmentation:
    """DACS's strong augmentation of normalised images: colour jitter (``jitter_strength`` for
    brightness, contrast, saturation and hue) when a uniform draw exceeds ``jitter_prob``, then a
    Gaussian blur (sigma uniform in ``blur_sigma``) when another exceeds 0.5."""

    jitter_strength: float = 0.2
    jitter_prob: float = 0.2
    blur: bool = True
    blur_sigma: tuple[float, float] = (0.15, 1.15)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def coins(self, generator: torch.Generator | None = None) -> tuple[bool, bool]:
        """(jitter?, blur?): two uniform draws, always both. DACS draws them once per iteration and
        applies them to every image of the mixed batch."""
        u = torch.rand(2, generator=generator, dtype=torch.float64)
        return bool(u[0] > self.jitter_prob), self.blur and bool(u[1] > 0.5)

    def __call__(self, images: torch.Tensor, jitter: bool, blur: bool,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Augment a batch. Draws, when ``jitter``: per image brightness, contrast, saturation
        factors in [1 - s, 1 + s] and a hue shift in [-s, s] (4 x B uniforms, in that order), then
        one order of the four operations (a randperm of 4); when ``blur``: one sigma for the batch."""
        if not (jitter or blur):
            return images
        mean = torch.tensor(self.mean, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
        x = images
        if jitter:
            s = self.jitter_strength
            u = torch.rand(4, images.shape[0], generator=generator, dtype=torch.float64)
            lo = torch.tensor([1 - s, 1 - s, 1 - s, -s], dtype=torch.float64)[:, None]
            f = (lo + 2 * s * u).float()
            order = torch.randperm(4, generator=generator).tolist()
            x = color_jitter((x * std + mean) / 255.0, f[0], f[1], f[2], f[3], order) * 255.0
            x = (x - mean) / std
        if blur:
            lo, hi = self.blur_sigma
            sigma = lo + (hi - lo) * float(torch.rand((), generator=generator, dtype=torch.float64))
            x = gaussian_blur(x, sigma)
        return x


# --------------------------------------------------------------------------------------------
# Masked image consistency
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def block_mask(batch: int, height: int, width: int, block: int = MASK_BLOCK, ratio: float = MASK_RATIO,
               generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """MIC's random block mask (B, 1, H, W) float, 1 = kept, 0 = masked: one uniform draw per
    block of a round(H / block) x round(W / block) grid (at least one block per axis), a block
    kept when its draw exceeds ``ratio``, blocks upsampled by nearest neighbour to H x W."""
    grid = (batch, 1, max(round(height / block), 1), max(round(width / block), 1))
    keep = (torch.rand(grid, generator=generator) > ratio).float()
    return F.interpolate(keep.to(device), size=(height, width), mode="nearest")


def masked_consistency_input(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MIC's masked images: normalised images times the block mask (masked pixels become the
    normalisation mean, 0)."""
    return images * mask.to(images.dtype)

