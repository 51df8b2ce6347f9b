"""8-connected components of a trainId label map, and how many small label components a
prediction recovers.

``label_components`` labels every class 0..18 in one pass, in numpy, without OpenCV or scipy:
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
it with scipy.ndimage.label. MRLF's large-component mask (``mrlf.components``) is built on it.

Void (255) and 19 (the one-hot "ignore" channel) are never part of a component.

``small_component_hits`` measures small objects: of the label's components smaller than N pixels
(poles, traffic lights, far people), how many a prediction gets mostly right.
"""
from __future__ import annotations

import numpy as np
import torch

NUM_CLASSES = 19  # trainIds 0..18; 19 and 255 are excluded


def as_label_array(seg) -> np.ndarray:
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


def label_runs(seg: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
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
    seg = as_label_array(seg)
    if seg.size == 0:
        return np.zeros(seg.shape, np.int32), np.zeros(0, np.int64), np.zeros(0, np.int64)
    run_label, length, classes, areas = label_runs(seg)
    return np.repeat(run_label, length).reshape(seg.shape), classes, areas


def small_component_hits(label, pred, max_area: int = 16,
                         num_classes: int = NUM_CLASSES) -> tuple[np.ndarray, np.ndarray]:
    """Per class: (hits, totals) over the label's 8-connected components of fewer than ``max_area``
    pixels; a component is a hit when more than half of its pixels are predicted as its class.

    Counts, so that images pool by summing; ``component_recall`` turns them into shares. ``label``
    and ``pred`` are (H, W) integer maps of the same shape (numpy or torch)."""
    label, pred = as_label_array(label), as_label_array(pred)
    if label.shape != pred.shape:
        raise ValueError(f"label {label.shape} and prediction {pred.shape} differ in shape")
    labels, classes, areas = label_components(label)
    correct = np.bincount(labels.ravel(), weights=(pred == label).ravel(), minlength=len(areas) + 1)[1:]
    small = areas < max_area
    hit = small & (2 * correct > areas)
    hits = np.bincount(classes[hit], minlength=num_classes)[:num_classes]
    totals = np.bincount(classes[small], minlength=num_classes)[:num_classes]
    return hits.astype(np.int64), totals.astype(np.int64)


def component_recall(hits: np.ndarray, totals: np.ndarray, classes=None) -> float:
    """Share of small components recovered, pooled over `classes` (default: all); NaN without any."""
    idx = slice(None) if classes is None else list(classes)
    n = int(np.asarray(totals)[idx].sum())
    return float(np.asarray(hits)[idx].sum() / n) if n else float("nan")

