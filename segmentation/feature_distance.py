"""DAFormer's ImageNet feature distance on thing classes: a regulariser that keeps the trained
backbone's deepest features close to those of a frozen copy of its initial (ImageNet) weights, on
the feature cells whose ratio-downscaled label is a thing class.

DGInStyle trains its segmentors with it (DAFormer's ``dacs_fdthings_srconly``, lambda 0.005):
loss = CE + lambda * FD. ``train/train_segmentation.py --fd-lambda`` switches it on.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from .labels import IGNORE

# Cityscapes trainIds of DAFormer's thing classes (imnet_feature_dist_classes): traffic light, traffic
# sign, person, rider, car, truck, bus, train, motorcycle, bicycle.
THING_CLASSES = (6, 7, 11, 12, 13, 14, 15, 16, 17, 18)


def downscale_label_ratio(label: torch.Tensor, scale: int, min_ratio: float, num_classes: int,
                          ignore_index: int = IGNORE) -> torch.Tensor:
    """(B, H, W) or (B, 1, H, W) integer labels -> (B, H // scale, W // scale) long: per
    scale x scale cell the most frequent class, if it covers at least ``min_ratio`` of the cell,
    else ``ignore_index``. Void (``ignore_index``, or any value outside 0..num_classes-1) is
    counted as a class of its own, so a mostly-void cell is void. Rows / columns beyond a whole
    cell are dropped. Ties go to the lower class id. DAFormer's ``downscale_label_ratio``
    (one-hot average pooling), with the one-hot counts accumulated per cell instead of
    materialising a (B, C + 1, H, W) tensor."""
    if label.dim() == 4:
        if label.shape[1] != 1:
            raise ValueError(f"expected (B, H, W) or (B, 1, H, W) labels, got {tuple(label.shape)}")
        label = label[:, 0]
    if label.dim() != 3:
        raise ValueError(f"expected (B, H, W) or (B, 1, H, W) labels, got {tuple(label.shape)}")
    scale = int(scale)
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    b, h, w = label.shape[0], label.shape[1] // scale, label.shape[2] // scale
    lab = label[:, :h * scale, :w * scale].long()
    lab = torch.where((lab >= 0) & (lab < num_classes), lab, num_classes)  # void -> class num_classes
    cells = lab.reshape(b, h, scale, w, scale).permute(0, 1, 3, 2, 4).reshape(b, h, w, scale * scale)
    counts = torch.zeros(b, h, w, num_classes + 1, device=label.device)
    counts.scatter_add_(-1, cells, torch.ones_like(cells, dtype=counts.dtype))
    ratio, out = (counts / (scale * scale)).max(-1)
    out[out == num_classes] = ignore_index
    out[ratio < min_ratio] = ignore_index
    return out


def feature_distance(feat: torch.Tensor, ref: torch.Tensor, label: torch.Tensor | None = None,
                     classes=THING_CLASSES, min_ratio: float = 0.75, num_classes: int = 19) -> torch.Tensor:
    """DAFormer's masked ImageNet feature distance (``calc_feat_dist``), in fp32: the mean over the
    feature cells of ``||feat - ref||_2`` (over channels). With a ``label`` (B, H, W) only the cells
    whose ratio-downscaled label (`downscale_label_ratio`, scale = label width // feature width)
    is one of ``classes`` count; none of them gives 0 (DAFormer's mean would be NaN), with zero
    gradients. ``ref`` is treated as a constant."""
    if feat.shape != ref.shape:
        raise ValueError(f"feature shapes differ: {tuple(feat.shape)} vs {tuple(ref.shape)}")
    dist = torch.linalg.vector_norm(feat.float() - ref.detach().float(), dim=1)  # (B, h, w)
    if label is None:
        return dist.mean()
    if label.dim() == 4:
        label = label[:, 0]
    (fh, fw), scale = dist.shape[-2:], max(label.shape[-1] // dist.shape[-1], 1)
    # Fit the label to exactly fh x fw cells (void padding / cropping) when the sizes are not
    # multiples of the feature stride; for the usual 512 crops this changes nothing.
    ph, pw = fh * scale - label.shape[-2], fw * scale - label.shape[-1]
    if ph or pw:
        label = F.pad(label, (0, max(pw, 0), 0, max(ph, 0)), value=IGNORE)[:, :fh * scale, :fw * scale]
    small = downscale_label_ratio(label, scale, min_ratio, num_classes)
    mask = torch.isin(small, torch.as_tensor(tuple(classes), device=small.device, dtype=small.dtype))
    mask = mask.to(dist.dtype)
    return (dist * mask).sum() / mask.sum().clamp(min=1.0)


class FeatureDistance:
    """The ImageNet feature-distance regulariser: a frozen copy of ``backbone`` as it is now (make it
    right after the pretrained weights are loaded), compared with the features the training forward
    returns, so the trained model needs no second pass."""

    def __init__(self, backbone: torch.nn.Module, classes=THING_CLASSES, min_ratio: float = 0.75,
                 num_classes: int = 19):
        self.frozen = copy.deepcopy(backbone).eval().requires_grad_(False)
        self.classes, self.min_ratio, self.num_classes = tuple(int(c) for c in classes), float(min_ratio), num_classes

    def reference(self, image: torch.Tensor) -> torch.Tensor:
        """The frozen backbone's deepest features of ``image`` (eval mode, no grad)."""
        self.frozen.eval()
        with torch.no_grad():
            return self.frozen(image)[-1]

    def __call__(self, feat: torch.Tensor, ref: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """FD between the trained backbone's deepest features ``feat`` (of the image whose frozen
        features are ``ref``) on the thing cells of ``label``."""
        return feature_distance(feat, ref, label, self.classes, self.min_ratio, self.num_classes)
