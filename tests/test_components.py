"""mrlf.components against scipy.ndimage.label (8-connectivity), plus hand-made layouts."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mrlf.components import label_components, large_component_mask, latent_mask
from segmentation.synthetic import street_scene

ndimage = pytest.importorskip("scipy.ndimage")
EIGHT = np.ones((3, 3), dtype=bool)


def scipy_labels(seg):
    """Per class c in 0..18: scipy's 8-connected labels of seg == c, and the (class, area) list."""
    out, comps = {}, []
    for c in np.unique(seg):
        if c >= 19:
            continue
        lab, _ = ndimage.label(seg == c, EIGHT)
        out[int(c)] = lab
        comps += [(int(c), int(a)) for a in np.bincount(lab.ravel())[1:]]
    return out, sorted(comps)


def check_against_scipy(seg, thresholds=(0, 5, 50)):
    labels, classes, areas = label_components(seg)
    ref, ref_comps = scipy_labels(seg)
    assert sorted(zip(classes.tolist(), areas.tolist())) == ref_comps
    assert ((labels == 0) == (seg >= 19)).all()
    # same partition: within each class our labels and scipy's are in one-to-one correspondence
    for c, lab in ref.items():
        m = seg == c
        pairs = np.unique(np.stack([labels[m], lab[m]]), axis=1)
        assert len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]
        assert (classes[labels[m] - 1] == c).all()
    for t in thresholds:
        mask, kept = large_component_mask(seg, t)
        ref_mask = np.zeros(seg.shape, bool)
        for lab in ref.values():
            big = np.flatnonzero(np.bincount(lab.ravel()) > t)
            ref_mask |= np.isin(lab, big[big > 0])
        assert np.array_equal(mask, ref_mask)
        assert sorted((k.cls, k.area) for k in kept) == sorted(x for x in ref_comps if x[1] > t)


def test_random_maps_match_scipy():
    rng = np.random.default_rng(0)
    for _ in range(150):
        H, W = rng.integers(1, 48, size=2)
        k = int(rng.integers(1, 6))
        seg = rng.integers(0, k, size=(H, W)).astype(np.uint8)
        seg[rng.random((H, W)) < rng.uniform(0, 0.3)] = rng.choice([19, 255])
        check_against_scipy(seg)


def test_blobby_random_maps_match_scipy():
    """Smoothed noise gives large tangled components (many union-find rounds)."""
    rng = np.random.default_rng(1)
    for _ in range(10):
        noise = ndimage.gaussian_filter(rng.standard_normal((160, 200)), sigma=float(rng.uniform(1, 4)))
        seg = np.digitize(noise, np.quantile(noise, [0.3, 0.5, 0.7])).astype(np.uint8)
        check_against_scipy(seg, thresholds=(0, 100, 2000))


def test_full_size_random_and_synthetic_maps_match_scipy():
    check_against_scipy(np.random.default_rng(2).integers(0, 19, (256, 256), dtype=np.uint8))
    for s in range(4):
        check_against_scipy(street_scene(256, 512, s), thresholds=(0, 2000, 20000))
    check_against_scipy(street_scene(512, 512, 7), thresholds=(20000, 30000))


def test_diagonal_neighbours_are_connected():
    seg = np.full((5, 5), 255, np.uint8)
    seg[1, 1] = seg[2, 2] = seg[1, 3] = seg[2, 4] = 3  # a zigzag whose pixels touch only at corners
    labels, classes, areas = label_components(seg)
    assert classes.tolist() == [3] and areas.tolist() == [4]
    seg[2, 2] = 255  # break it: (1,1) alone, (1,3)-(2,4) still joined diagonally
    assert sorted(label_components(seg)[2].tolist()) == [1, 2]
    seg2 = np.full((4, 4), 255, np.uint8)
    seg2[0, 3] = seg2[1, 2] = seg2[2, 1] = seg2[3, 0] = 7  # anti-diagonal line
    seg2[0, 0] = 7  # isolated
    _, classes, areas = label_components(seg2)
    assert sorted(areas.tolist()) == [1, 4]
    seg3 = np.array([[1, 0], [0, 1]], np.uint8)  # two classes crossing diagonally: both connect
    _, classes, areas = label_components(seg3)
    assert sorted(zip(classes.tolist(), areas.tolist())) == [(0, 2), (1, 2)]


def test_different_classes_are_separate_components():
    seg = np.zeros((4, 6), np.uint8)
    seg[:, 3:] = 1
    _, classes, areas = label_components(seg)
    assert classes.tolist() == [0, 1] and areas.tolist() == [12, 12]


def test_known_rectangles_and_threshold_strictness():
    seg = np.full((200, 300), 255, np.uint8)
    seg[10:60, 10:110] = 13  # 5000 px car
    seg[100:150, 10:70] = 13  # 3000 px car (separate)
    seg[0:200, 150:160] = 0  # 2000 px road
    seg[70:71, 200:300] = 19  # the "ignore" channel value: never a component
    labels, classes, areas = label_components(seg)
    assert sorted(zip(classes.tolist(), areas.tolist())) == [(0, 2000), (13, 3000), (13, 5000)]
    # numbering follows the first pixel in raster order
    assert labels[0, 150] == 1 and labels[10, 10] == 2 and labels[100, 10] == 3
    mask, kept = large_component_mask(seg, 3000)  # strictly greater: 3000 is dropped
    assert [(k.cls, k.area) for k in kept] == [(13, 5000)] and mask.sum() == 5000
    mask, kept = large_component_mask(seg, 2999)
    assert sorted(k.area for k in kept) == [3000, 5000] and mask.sum() == 8000
    assert mask[10:60, 10:110].all() and mask[100:150, 10:70].all() and not mask[:, 150:160].any()
    mask, kept = large_component_mask(seg, 1999)
    assert mask.sum() == 10000 and not mask[70, 200:].any()


def test_void_and_19_are_excluded():
    for v in (19, 255):
        seg = np.full((30, 40), v, np.uint8)
        labels, classes, areas = label_components(seg)
        assert classes.size == 0 and not labels.any()
        mask, kept = large_component_mask(seg, 0)
        assert not mask.any() and kept == []
    seg = np.full((30, 40), 255, np.uint8)
    seg[:, 20:] = 19
    seg[5, 5] = 2
    assert large_component_mask(seg, 0)[0].sum() == 1


def test_input_types_and_shapes():
    seg = street_scene(64, 96, 3)
    ref = label_components(seg)
    for variant in (torch.from_numpy(seg), seg.astype(np.int64), torch.from_numpy(seg).long()):
        got = label_components(variant)
        assert all(np.array_equal(a, b) for a, b in zip(got, ref))
    for empty in (np.zeros((0, 5), np.uint8), np.zeros((3, 0), np.uint8)):
        labels, classes, areas = label_components(empty)
        assert labels.shape == empty.shape and classes.size == 0
        assert large_component_mask(empty, 0)[0].shape == empty.shape
    with pytest.raises(ValueError):
        label_components(np.zeros((2, 3, 4), np.uint8))
    with pytest.raises(ValueError):
        label_components(np.zeros((4, 4), np.float32))


@pytest.mark.parametrize("shape", [(512, 512), (1024, 512), (100, 60), (64, 64), (13, 27)])
@pytest.mark.parametrize("factor", [2, 4, 8])
def test_latent_mask_equals_interpolate_nearest(shape, factor):
    g = torch.Generator().manual_seed(0)
    m = torch.rand(shape, generator=g) > 0.5
    ref = F.interpolate(m[None, None].float(), scale_factor=1 / factor, mode="nearest")[0, 0]
    out = latent_mask(m, factor)
    assert out.dtype == torch.bool and out.shape == ref.shape
    assert torch.equal(out.float(), ref)
    assert np.array_equal(latent_mask(m.numpy(), factor), ref.bool().numpy())
    batched = latent_mask(m.float()[None, None].expand(2, 3, *shape), factor)
    assert batched.shape == (2, 3) + ref.shape and torch.equal(batched[1, 2], ref)


def test_latent_mask_is_the_reference_sampling():
    m = np.zeros((512, 512), bool)
    m[4::4, 4::4] = True  # only the pixels at multiples of 4 (not 0) matter
    lat = latent_mask(m, 4)
    assert lat.shape == (128, 128) and lat[1:, 1:].all() and not lat[0].any() and not lat[:, 0].any()
    with pytest.raises(ValueError):
        latent_mask(m, 0)
    with pytest.raises(ValueError):
        latent_mask(m, 2.5)
