"""MRLF's large-component mask, on the 8-connected labelling of ``segmentation.components``.

The original (``tools/refine.get_connected_components``, mode "large") runs OpenCV's
8-connected labelling on ``seg == c`` for every class c present except 255, keeps
components with area ``> threshold`` (strictly) and uses their union as the inpainting
mask. Only the union matters, so any exact 8-connected labelling gives the same mask.

Ours labels all classes in one pass (``segmentation.components.label_components``, in numpy,
without OpenCV or scipy) and keeps the runs of the large components.

Void (255) and 19 (the one-hot "ignore" channel) are never part of a component.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from segmentation.components import as_label_array, label_components, label_runs


@dataclass(frozen=True)
class Component:
    label: int  # id in the label image returned by label_components (1-based)
    cls: int  # trainId
    area: int  # pixels


def large_component_mask(seg, threshold: int) -> tuple[np.ndarray, list[Component]]:
    """Union of the components with area strictly greater than ``threshold``.

    Returns ``(mask, kept)``: mask is bool (H, W); kept lists the components in the mask
    (class and area, for reporting). The original's thresholds: 30000 (demo), 20000
    (gen_datasets), both at 512x512.
    """
    seg = as_label_array(seg)
    if seg.size == 0:
        return np.zeros(seg.shape, bool), []
    run_label, length, classes, areas = label_runs(seg)
    keep = np.concatenate([[False], areas > threshold])
    kept = [Component(int(k), int(classes[k - 1]), int(areas[k - 1])) for k in np.flatnonzero(keep)]
    return np.repeat(keep[run_label], length).reshape(seg.shape), kept


def latent_mask(mask, factor: int):
    """Nearest downsample by an integer ``factor``: ``M[i, j] = mask[f*i, f*j]``.

    Equals ``F.interpolate(mask, scale_factor=1/f, mode='nearest')`` (PyTorch's legacy
    nearest, output ``floor(H/f) x floor(W/f)``), which the original applies with a
    hard-coded 512; here the size comes from the input. Works on the last two dims of
    a numpy array or a tensor of any dtype (bool included) and keeps its type.
    """
    f = int(factor)
    if f < 1 or f != factor:
        raise ValueError(f"factor must be a positive integer, got {factor}")
    H, W = mask.shape[-2:]
    out = mask[..., : (H // f) * f : f, : (W // f) * f : f]
    return out.contiguous() if isinstance(out, torch.Tensor) else np.ascontiguousarray(out)


__all__ = ["Component", "label_components", "large_component_mask", "latent_mask"]
