"""Confusion matrix, per-class IoU and mIoU (mmseg's convention), distributed reduction; the entropy of a
class distribution and mean ± std over seeds.

Convention (mmseg ``mean_iou``, used by DGInStyle-SegModel's ``tools/test.py --eval mIoU``):
- pixels whose ground truth is ``ignore_index`` (255) are dropped; so are ground-truth values
  outside 0..num_classes-1 (they cannot be scored);
- the confusion matrix ``cm[t, p]`` counts ground-truth class t predicted as p, summed over the
  whole dataset (not averaged per image);
- IoU_c = cm[c, c] / (sum_p cm[c, p] + sum_t cm[t, c] - cm[c, c]);
- a class absent from both the ground truth and the predictions has union 0: its IoU is NaN and
  it is left out of the mean; mIoU = nanmean over classes. A class that is predicted but absent
  from the ground truth has IoU 0 and *does* count.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist

from .labels import CLASS_NAMES, IGNORE, NUM_CLASSES


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int = NUM_CLASSES,
                     ignore_index: int = IGNORE) -> torch.Tensor:
    """(num_classes, num_classes) int64 counts, rows = ground truth, columns = prediction.

    ``pred`` and ``target`` are integer tensors of the same shape (any batch layout)."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    t = target.reshape(-1).long()
    p = pred.reshape(-1).to(t.device).long()
    keep = (t != ignore_index) & (t >= 0) & (t < num_classes)
    t, p = t[keep], p[keep]
    if p.numel() and (p.min() < 0 or p.max() >= num_classes):
        raise ValueError(f"predictions must be in 0..{num_classes - 1}, got {int(p.min())}..{int(p.max())}")
    return torch.bincount(t * num_classes + p, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def iou_from_confusion(cm: torch.Tensor) -> torch.Tensor:
    """Per-class IoU (float64), NaN where the class is in neither ground truth nor prediction."""
    cm = cm.double()
    inter = cm.diagonal()
    union = cm.sum(0) + cm.sum(1) - inter
    return torch.where(union > 0, inter / union.clamp_min(1), torch.full_like(inter, math.nan))


def accuracy_from_confusion(cm: torch.Tensor) -> tuple[float, torch.Tensor]:
    """(overall pixel accuracy, per-class accuracy with NaN where the class has no GT pixel)."""
    cm = cm.double()
    gt = cm.sum(1)
    acc = torch.where(gt > 0, cm.diagonal() / gt.clamp_min(1), torch.full_like(gt, math.nan))
    total = cm.sum()
    return (float(cm.diagonal().sum() / total) if total > 0 else math.nan), acc


def nanmean(x: torch.Tensor) -> float:
    x = x[~torch.isnan(x)]
    return float(x.mean()) if x.numel() else math.nan


def mean_iou(cm: torch.Tensor) -> float:
    return nanmean(iou_from_confusion(cm))


def entropy(counts) -> float:
    """Entropy in bits of the distribution proportional to `counts` (counts or probabilities, >= 0):
    0 when one class has everything, log2(K) when K classes share equally. NaN for an all-zero input."""
    p = np.asarray(counts, dtype=np.float64).ravel()
    if (p < 0).any():
        raise ValueError(f"counts must be non-negative, got {p.tolist()}")
    if p.sum() == 0:
        return math.nan
    p = p[p > 0] / p.sum()
    return float(-(p * np.log2(p)).sum()) + 0.0  # + 0.0: no -0.0 for a single class


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1 in the denominator) of per-seed results; the
    standard deviation of a single value is NaN (one seed says nothing about the spread)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        raise ValueError("mean_std of no values")
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else math.nan


def summarize(cm: torch.Tensor, class_names=CLASS_NAMES) -> dict:
    """A JSON-able summary: mIoU, aAcc, mAcc and per-class IoU / Acc (fractions; NaN -> None)."""
    iou = iou_from_confusion(cm)
    aacc, acc = accuracy_from_confusion(cm)
    clean = lambda v: None if math.isnan(v) else float(v)  # noqa: E731
    return {
        "mIoU": clean(nanmean(iou)), "aAcc": clean(aacc), "mAcc": clean(nanmean(acc)),
        "IoU": {n: clean(v) for n, v in zip(class_names, iou.tolist())},
        "Acc": {n: clean(v) for n, v in zip(class_names, acc.tolist())},
        "pixels": int(cm.sum()),
    }


def all_reduce_confusion(cm: torch.Tensor) -> torch.Tensor:
    """Sum a confusion matrix over all ranks (no-op without an initialised process group). The
    matrix is moved to the device the backend needs (CUDA for NCCL) and back."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return cm
    device = cm.device
    if dist.get_backend() == "nccl" and device.type != "cuda":
        cm = cm.cuda()
    cm = cm.clone()
    dist.all_reduce(cm, op=dist.ReduceOp.SUM)
    return cm.to(device)


class ConfusionMeter:
    """Accumulate ``confusion_matrix`` over batches; ``result()`` all-reduces across ranks."""

    def __init__(self, num_classes: int = NUM_CLASSES, ignore_index: int = IGNORE, device="cpu"):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.cm = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        self.cm += confusion_matrix(pred, target.to(pred.device), self.num_classes, self.ignore_index).to(self.cm.device)

    def result(self, distributed: bool = True) -> torch.Tensor:
        return all_reduce_confusion(self.cm) if distributed else self.cm
