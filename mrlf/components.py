"""8-connected components of a trainId label map and MRLF's large-component mask.

The original (``tools/refine.get_connected_components``, mode "large") runs OpenCV's
8-connected labelling on ``seg == c`` for every class c present except 255, keeps
components with area ``> threshold`` (strictly) and uses their union as the inpainting
mask. Only the union matters, so any exact 8-connected labelling gives the same mask.

Ours labels all classes in one pass, in numpy, without OpenCV or scipy:
1. run-length encode each row (a run = maximal horizontal segment of one class);
2. link each run to the runs of the same class in the previous row that touch it
   8-connectedly (column ranges overlap after widening by one), found for all runs
   at once with two ``searchsorted`` calls;
3. union-find over those links, vectorised: hook every root to the smallest root it
   is linked to, then pointer-jump to the roots, until no link joins two roots;
4. component areas are sums of run lengths; masks and label images are
   ``np.repeat`` of per-run values, because the runs tile the image in raster order.
Street scenes have a few tens of runs per row, so steps 2-4 are cheap and the cost is
dominated by step 1 (a few passes over the pixels). ``bench/components.py`` compares
it with scipy.ndimage.label.

Void (255) and 19 (the one-hot "ignore" channel) are never part of a component.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

NUM_CLASSES = 19  # trainIds 0..18; 19 and 255 are excluded


@dataclass(frozen=True)
class Component:
    label: int  # id in the label image returned by label_components (1-based)
    cls: int  # trainId
    area: int  # pixels


def _as_numpy(seg) -> np.ndarray:
    if isinstance(seg, torch.Tensor):
        seg = seg.detach().cpu().numpy()
    seg = np.asarray(seg)
    if seg.ndim != 2:
        raise ValueError(f"label map must be 2-D (H, W), got shape {seg.shape}")
    if seg.dtype.kind not in "iub":
        raise ValueError(f"label map must be an integer array, got {seg.dtype}")
    return seg


def _runs(seg: np.ndarray):
    """Row runs in raster order: (flat start, length, row, first col, last col, class)."""
    H, W = seg.shape
    starts = np.ones((H, W), dtype=bool)
    np.not_equal(seg[:, 1:], seg[:, :-1], out=starts[:, 1:])
    start = np.flatnonzero(starts)
    length = np.diff(start, append=H * W)
    row, c0 = np.divmod(start, W)
    return start, length, row, c0, c0 + length - 1, seg.ravel()[start]


def _roots(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Root (smallest member) of every node of the graph with edges a[i] - b[i]."""
    parent = np.arange(n)
    while a.size:
        ra, rb = parent[a], parent[b]
        lo, hi = np.minimum(ra, rb), np.maximum(ra, rb)
        live = lo != hi
        if not live.any():
            break
        a, b, lo, hi = a[live], b[live], lo[live], hi[live]  # edges inside one tree are done
        # Hook roots onto smaller roots. With duplicate targets the last write wins, so write
        # in decreasing order of lo: each root gets the smallest root it is linked to.
        order = np.argsort(lo, kind="stable")[::-1]
        parent[hi[order]] = lo[order]
        # Pointer jumping until every node points at its root (parents only decrease).
        while True:
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
    return parent


def _label_runs(seg: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-run component label (0 = excluded), run lengths, component classes and areas."""
    start, length, row, c0, c1, cls = _runs(seg)
    W = seg.shape[1]
    valid = (cls >= 0) & (cls < NUM_CLASSES)

    # Links to the previous row: run j (row r, cols [c0, c1]) touches run i of row r-1 iff
    # c0_i <= c1_j + 1 and c1_i >= c0_j - 1. Keys row*(W+2)+col keep rows apart, so the
    # touching runs are one contiguous index range [lo, hi) found by binary search.
    stride = W + 2
    key0, key1 = row * stride + c0, row * stride + c1
    prev = (row - 1) * stride
    lo = np.searchsorted(key1, prev + c0 - 1, side="left")
    hi = np.searchsorted(key0, prev + c1 + 1, side="right")
    cnt = np.where(valid, np.maximum(hi - lo, 0), 0)
    j = np.repeat(np.arange(start.size), cnt)
    first = np.cumsum(cnt) - cnt  # position of each run's first link
    i = np.repeat(lo - first, cnt) + np.arange(j.size)
    same = cls[i] == cls[j]
    root = _roots(start.size, i[same], j[same])

    # Number the valid roots 1..n in raster order (a root is its component's first run).
    is_root = valid & (root == np.arange(start.size))
    comp_id = np.cumsum(is_root).astype(np.int32)
    run_label = np.where(valid, comp_id[root], 0).astype(np.int32)
    area = np.bincount(run_label, weights=length, minlength=int(comp_id[-1]) + 1)[1:].astype(np.int64)
    return run_label, length, cls[is_root].astype(np.int64), area


def label_components(seg) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """8-connected components of every class 0..18 of an (H, W) trainId map.

    Returns ``(labels, classes, areas)``: labels is int32 (H, W) with 0 for void/19 and
    1..n for the components, numbered by their first pixel in raster order;
    ``classes[k]`` and ``areas[k]`` (int64 arrays of length n) describe label ``k + 1``.
    """
    seg = _as_numpy(seg)
    if seg.size == 0:
        return np.zeros(seg.shape, np.int32), np.zeros(0, np.int64), np.zeros(0, np.int64)
    run_label, length, classes, areas = _label_runs(seg)
    return np.repeat(run_label, length).reshape(seg.shape), classes, areas


def large_component_mask(seg, threshold: int) -> tuple[np.ndarray, list[Component]]:
    """Union of the components with area strictly greater than ``threshold``.

    Returns ``(mask, kept)``: mask is bool (H, W); kept lists the components in the mask
    (class and area, for reporting). The original's thresholds: 30000 (demo), 20000
    (gen_datasets), both at 512x512.
    """
    seg = _as_numpy(seg)
    if seg.size == 0:
        return np.zeros(seg.shape, bool), []
    run_label, length, classes, areas = _label_runs(seg)
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
