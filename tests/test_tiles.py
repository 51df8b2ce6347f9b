"""mrlf.tiles: view coverage, the original's view list where the stride divides, weights, fusion."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from mrlf.tiles import View, accumulate_views, blend_weights, crop_views, fuse, fuse_views, get_views


def coverage(views, size):
    """How many views cover each latent, (H, W) int64."""
    c = torch.zeros(size, dtype=torch.int64)
    for v in views:
        c[v.h0:v.h1, v.w0:v.w1] += 1
    return c


def original_views(height_px, width_px, window=64, stride=8):
    """The original's tools/refine.get_views: (w0, h0, w1, h1) windows at multiples of the stride, row-major."""
    hl, wl = height_px / 8, width_px / 8  # float division, as in the original
    nh = int((hl - window) // stride + 1)
    nw = int((wl - window) // stride + 1)
    out = []
    for i in range(nh * nw):
        h0, w0 = int((i // nw) * stride), int((i % nw) * stride)
        out.append((w0, h0, w0 + window, h0 + window))
    return out


@pytest.mark.parametrize("size,window,stride,n", [(128, 64, 16, 25), (128, 64, 8, 81), (64, 64, 64, 1),
                                                  (64, 64, 8, 1), (96, 64, 32, 4)])
def test_view_counts_of_the_original_settings(size, window, stride, n):
    views = get_views(size, size, window, stride)
    assert len(views) == n
    assert [v.original for v in views] == original_views(8 * size, 8 * size, window, stride)


def test_identical_to_original_whenever_the_stride_divides():
    checked = 0
    for h, w, window, stride in itertools.product(range(16, 161, 8), range(16, 161, 24), (16, 32, 64), (4, 8, 16, 64)):
        if window > min(h, w) or stride > window or (h - window) % stride or (w - window) % stride:
            continue
        views = get_views(h, w, window, stride)
        assert [v.original for v in views] == original_views(8 * h, 8 * w, window, stride), (h, w, window, stride)
        checked += 1
    assert checked > 50


def test_every_latent_covered_and_views_in_bounds():
    for h, w, window, stride in itertools.product((1, 7, 33, 64, 65, 100, 127, 128, 131),
                                                  (5, 64, 90, 128, 200), (16, 48, 64), (3, 8, 16)):
        if stride > window:
            continue
        views = get_views(h, w, window, stride)
        wh, ww = min(window, h), min(window, w)
        assert all(v.height == wh and v.width == ww for v in views)
        assert all(0 <= v.h0 < v.h1 <= h and 0 <= v.w0 < v.w1 <= w for v in views)
        assert coverage(views, (h, w)).min() >= 1, (h, w, window, stride)
        assert len(set(views)) == len(views)
        # starts on the stride grid, plus at most one edge-aligned start per axis
        hs, ws = sorted({v.h0 for v in views}), sorted({v.w0 for v in views})
        for starts, last in ((hs, h - wh), (ws, w - ww)):
            grid = [s for s in starts if s % stride == 0]
            assert grid == list(range(0, grid[-1] + 1, stride))
            assert set(starts) - set(grid) <= {last} and starts[-1] == last
        assert len(views) == len(hs) * len(ws)
        # row-major: sorted by (h0, w0)
        assert views == sorted(views, key=lambda v: (v.h0, v.w0))


def test_extra_edge_view_when_stride_does_not_divide():
    views = get_views(100, 128, 64, 16)  # (100 - 64) % 16 = 4 -> starts 0, 16, 32 and the extra 36
    assert sorted({v.h0 for v in views}) == [0, 16, 32, 36]
    assert sorted({v.w0 for v in views}) == [0, 16, 32, 48, 64]
    assert len(views) == 20
    # the original leaves rows 96..99 uncovered
    orig = [View(h0, h1, w0, w1) for (w0, h0, w1, h1) in original_views(800, 1024, 64, 16)]
    assert coverage(orig, (100, 128))[96:].sum() == 0


def test_rectangular_window_and_stride_pairs():
    views = get_views(128, 96, window=(64, 32), stride=(32, 16))
    assert {(v.height, v.width) for v in views} == {(64, 32)}
    assert coverage(views, (128, 96)).min() >= 1
    assert len(views) == 3 * 5


def test_window_larger_than_latent_is_clamped_or_rejected():
    assert get_views(32, 32, 64, 64) == [View(0, 32, 0, 32)]  # a 256-px first pass: one view
    assert get_views(32, 128, 64, 64) == [View(0, 32, 0, 64), View(0, 32, 64, 128)]
    with pytest.raises(ValueError, match="larger than the latent"):
        get_views(32, 32, 64, 64, strict=True)


@pytest.mark.parametrize("args", [(0, 10, 4, 1), (10, 10, 0, 1), (10, 10, 4, 0), (100, 100, 16, 32)])
def test_bad_arguments_raise(args):
    with pytest.raises(ValueError):
        get_views(*args)


def test_latent_pixel_mapping():
    v = View(16, 80, 8, 72)
    assert v.scaled() == View(128, 640, 64, 576)
    assert v.scaled(4) == View(64, 320, 32, 288)
    img = torch.arange(1024 * 1024.0).reshape(1024, 1024)
    p = v.scaled()
    assert img[p.slices].shape == (8 * v.height, 8 * v.width)
    assert img[p.slices][0, 0] == img[8 * v.h0, 8 * v.w0]


@pytest.mark.parametrize("h,w", [(64, 64), (7, 12), (1, 1), (2, 5)])
def test_blend_weights(h, w):
    assert torch.equal(blend_weights(h, w), torch.ones(h, w))
    for mode in ("tent", "gaussian"):
        wt = blend_weights(h, w, mode)
        assert wt.shape == (h, w) and wt.dtype == torch.float32
        assert (wt > 0).all() and wt.max().item() == pytest.approx(1.0)
        assert torch.allclose(wt, wt.flip(0)) and torch.allclose(wt, wt.flip(1))
        if h > 2:  # centre outweighs the border
            assert wt[h // 2, w // 2] > wt[0, w // 2]
    tent = blend_weights(64, 64, "tent", dtype=torch.float64)
    assert tent[0, 32].item() == pytest.approx(1 / 63, rel=1e-6)  # ends 1/n, over the even-length peak 1 - 1/n
    gauss = blend_weights(64, 64, "gaussian", dtype=torch.float64)  # sigma 0.25 of the window
    # the first and the central latents' centres, in sigmas; each axis is scaled to a peak of 1
    edge, peak = (0.5 / 64 - 0.5) / 0.25, (0.5 / 64) / 0.25
    assert gauss[0, 31].item() == pytest.approx(math.exp(-0.5 * (edge**2 - peak**2)), rel=1e-9)  # ~0.14
    with pytest.raises(ValueError):
        blend_weights(4, 4, "cosine")


def naive_fusion(tiles, views, size, weights):
    """Full-canvas padded copies, one per view: the obvious (slow) definition."""
    H, W = size
    value = torch.zeros(tiles.shape[1:-2] + (H, W), dtype=torch.float64)
    count = torch.zeros(H, W, dtype=torch.float64)
    for i, v in enumerate(views):
        pad = (v.w0, W - v.w1, v.h0, H - v.h1)
        wi = (weights[i] if weights.dim() == 3 else weights).double()
        value += F.pad(tiles[i].double() * wi, pad)
        count += F.pad(wi, pad)
    return torch.where(count > 0, value / count.clamp_min(1e-300), value)


@pytest.mark.parametrize("mode", ["uniform", "tent", "gaussian", "per_view"])
def test_fusion_equals_naive_loop(mode):
    g = torch.Generator().manual_seed(0)
    H, W = 40, 52
    views = get_views(H, W, 16, 6)
    tiles = torch.randn(len(views), 2, 3, 16, 16, generator=g)  # (V, B, C, h, w)
    if mode == "per_view":
        weights = torch.rand(len(views), 16, 16, generator=g) + 0.1
    else:
        weights = blend_weights(16, 16, mode)
    fused = fuse_views(tiles, views, (H, W), weights)
    assert fused.shape == (2, 3, H, W) and fused.dtype == tiles.dtype
    torch.testing.assert_close(fused.double(), naive_fusion(tiles, views, (H, W), weights), rtol=1e-6, atol=1e-6)
    # each batch element is fused independently
    torch.testing.assert_close(fuse_views(tiles[:, 1], views, (H, W), weights), fused[1])


def test_fusion_of_consistent_crops_is_the_identity():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 37, 45, generator=g, dtype=torch.float64)
    views = get_views(37, 45, 16, 5)
    for mode in ("uniform", "tent", "gaussian"):
        wt = blend_weights(16, 16, mode, dtype=torch.float64)
        torch.testing.assert_close(fuse_views(crop_views(x, views), views, (37, 45), wt), x)


def test_uncovered_latents_fuse_to_zero_and_counts():
    views = [View(0, 4, 0, 4), View(2, 6, 2, 6)]
    tiles = torch.ones(2, 1, 4, 4) * torch.tensor([2.0, 4.0])[:, None, None, None]
    value, count = accumulate_views(tiles, views, (8, 8))
    assert count.sum() == 32 and count[2:4, 2:4].eq(2).all() and count[6:].eq(0).all()
    out = fuse(value, count)
    assert out[0, 0, 0] == 2 and out[0, 5, 5] == 4 and out[0, 3, 3] == 3 and out[0, 7, 7] == 0


def test_half_precision_accumulates_in_float32():
    views = get_views(24, 24, 16, 4)
    g = torch.Generator().manual_seed(0)
    # sums of up to nine values near 1000 pass 2048, where fp16's spacing is 2: an fp16 sum rounds
    tiles = (1000 + 24 * torch.rand(len(views), 1, 16, 16, generator=g)).half()
    out = fuse_views(tiles, views, (24, 24))
    assert out.dtype == torch.float16 and torch.equal(out, fuse_views(tiles.double(), views, (24, 24)).half())


def test_fusion_rejects_mismatched_inputs():
    views = get_views(32, 32, 16, 8)
    with pytest.raises(ValueError):
        fuse_views(torch.zeros(len(views) - 1, 1, 16, 16), views, (32, 32))
    with pytest.raises(ValueError):
        fuse_views(torch.zeros(len(views), 1, 16, 16), views, (24, 32))  # views out of bounds
    with pytest.raises(ValueError):
        fuse_views(torch.zeros(len(views), 1, 16, 16), views, (32, 32), torch.ones(8, 8))
