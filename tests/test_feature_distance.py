"""DAFormer's ImageNet feature distance on thing classes (segmentation.feature_distance): the ratio
label downscaling, the masked distance, the frozen reference and where its gradients go."""
import numpy as np
import pytest
import torch

from segmentation.models import build_segmentor
from segmentation.feature_distance import THING_CLASSES, FeatureDistance, downscale_label_ratio, feature_distance

V = 255  # void


def naive_downscale(label: np.ndarray, s: int, min_ratio: float, n: int) -> np.ndarray:
    """Cell by cell with np.bincount: majority class (void = its own class, lowest id on ties)."""
    b, h, w = label.shape[0], label.shape[1] // s, label.shape[2] // s
    out = np.full((b, h, w), V, dtype=np.int64)
    for k in range(b):
        for i in range(h):
            for j in range(w):
                cell = label[k, i * s:(i + 1) * s, j * s:(j + 1) * s].astype(np.int64).ravel()
                cell = np.where((cell >= 0) & (cell < n), cell, n)
                counts = np.bincount(cell, minlength=n + 1)
                c = int(counts.argmax())
                if c != n and counts[c] / (s * s) >= min_ratio:
                    out[k, i, j] = c
    return out


def test_downscale_label_ratio_hand_built_cells():
    label = torch.tensor([[
        [13, 13, 13, 13, 13, 13],
        [13, 13, 13, 0, 0, 0],
        [V, V, V, 13, 5, 6],
        [V, 13, 13, 13, 7, 8],
    ]])
    # cells: all 13 | 3/4 13 (= min ratio) | 2/4 13 vs 2/4 0
    #        3/4 void | 3/4 13 beside void | four classes
    expect = torch.tensor([[[13, 13, V], [V, 13, V]]])
    assert torch.equal(downscale_label_ratio(label, 2, 0.75, 19), expect)
    assert downscale_label_ratio(label, 2, 0.75, 19).dtype == torch.long
    # (B, 1, H, W) input and rows / columns beyond a whole cell are dropped
    big = torch.full((1, 1, 5, 7), 3)
    big[0, 0, :4, :6] = label[0]
    assert torch.equal(downscale_label_ratio(big, 2, 0.75, 19), expect)
    # a lower threshold: the tie goes to the lower class id; 1/4 is the majority of the mixed cell
    assert torch.equal(downscale_label_ratio(label, 2, 0.5, 19), torch.tensor([[[13, 13, 0], [V, 13, V]]]))
    assert torch.equal(downscale_label_ratio(label, 2, 0.0, 19), torch.tensor([[[13, 13, 0], [V, 13, 5]]]))
    # values outside 0..n-1 (e.g. 19) are void too; scale 1 keeps the label (void -> 255)
    nineteen = torch.where(label == V, 19, label)
    assert torch.equal(downscale_label_ratio(nineteen, 2, 0.75, 19), expect)
    assert torch.equal(downscale_label_ratio(nineteen, 1, 0.75, 19), label)


@pytest.mark.parametrize("min_ratio", [0.0, 0.5, 0.75, 1.0])
def test_downscale_label_ratio_matches_cell_by_cell_counting(min_ratio):
    rng = np.random.default_rng(1)
    # few classes and blocky regions, so that every threshold matters
    base = rng.integers(0, 4, (3, 6, 5))
    label = np.kron(base, np.ones((3, 3), dtype=np.int64))[:, :17, :14]
    label = np.where(rng.random(label.shape) < 0.15, rng.choice([V, 1, 17], label.shape), label)
    for s in (2, 4, 8):
        got = downscale_label_ratio(torch.from_numpy(label).to(torch.uint8), s, min_ratio, 19)
        assert np.array_equal(got.numpy(), naive_downscale(label, s, min_ratio, 19)), s


def test_feature_distance_masks_thing_cells():
    torch.manual_seed(0)
    feat, ref = torch.randn(2, 5, 3, 4), torch.randn(2, 5, 3, 4)
    label = torch.zeros(2, 24, 32, dtype=torch.long)  # road; cells of 8 x 8
    label[0, 0:8, 8:16] = 13  # car
    label[1, 16:24, 24:32] = 11  # person
    label[1, 8:16, 0:8] = 12  # rider, but only half the cell: not counted at 0.75
    label[1, 8:12, 0:8] = V
    fd = feature_distance(feat, ref, label)
    dist = (feat - ref).norm(dim=1)
    assert fd.dtype == torch.float32
    assert fd.item() == pytest.approx(((dist[0, 0, 1] + dist[1, 2, 3]) / 2).item(), rel=1e-6)
    # relabelling a non-thing region (road -> building, -> void) or changing the features there
    # changes nothing
    for other in (2, V):
        relabelled = label.clone()
        relabelled[0, 8:24] = other
        assert feature_distance(feat, ref, relabelled).item() == fd.item()
    moved = ref.clone()
    moved[0, :, 2, 2] += 10  # a road cell
    moved[1, :, 1, 0] += 10  # the half-rider cell
    assert feature_distance(feat, moved, label).item() == fd.item()
    moved[0, :, 0, 1] += 10  # the car cell
    assert feature_distance(feat, moved, label).item() != fd.item()
    # a thing region turned to road leaves the mean over the other thing cell
    less = label.clone()
    less[0, 0:8, 8:16] = 0
    assert feature_distance(feat, ref, less).item() == pytest.approx(dist[1, 2, 3].item(), rel=1e-6)
    # other classes on request; no label: the plain mean over all cells
    assert feature_distance(feat, ref, label, classes=[0]).item() == pytest.approx(
        dist[(downscale_label_ratio(label, 8, 0.75, 19) == 0)].mean().item(), rel=1e-6)
    assert feature_distance(feat, ref).item() == pytest.approx(dist.mean().item(), rel=1e-6)


def test_no_thing_cells_gives_zero_and_zero_gradients():
    feat = torch.randn(1, 4, 2, 2, requires_grad=True)
    ref = torch.randn(1, 4, 2, 2)
    label = torch.zeros(1, 64, 64, dtype=torch.long)
    label[0, :8, :8] = 13  # too small a part of its 32 x 32 cell
    fd = feature_distance(feat, ref, label)
    assert fd.item() == 0.0 and torch.isfinite(fd)
    fd.backward()
    assert torch.equal(feat.grad, torch.zeros_like(feat))


def test_label_sizes_not_a_multiple_of_the_stride_are_fitted():
    """A 48-pixel crop gives 2 x 2 stride-32 features (ceil): the label is padded with void to
    whole cells of 48 // 2 = 24 pixels, as DAFormer's width-based scale factor implies."""
    feat, ref = torch.randn(1, 3, 2, 2), torch.zeros(1, 3, 2, 2)
    label = torch.full((1, 48, 40), 13)
    fd = feature_distance(feat, ref, label)  # scale 20: rows 0-19 | 20-39 (40-47 dropped), cols 0-19 | 20-39
    assert fd.item() == pytest.approx(feat.norm(dim=1).mean().item(), rel=1e-6)
    label = torch.full((1, 30, 48), 13)  # scale 24: the second row of cells is 6/24 label, the rest void
    fd = feature_distance(feat, ref, label)
    assert fd.item() == pytest.approx(feat.norm(dim=1)[0, 0].mean().item(), rel=1e-6)


def _model_and_batch(size=128):
    torch.manual_seed(0)
    model = build_segmentor("tiny").train()
    x = torch.randn(2, 3, size, size)
    label = torch.full((2, size, size), 13)  # all car: every stride-32 cell counts
    label[1, :, : size // 2] = 0
    return model, x, label


def test_frozen_copy_zero_when_identical_positive_after_change():
    model, x, label = _model_and_batch()
    fd = FeatureDistance(model.backbone)
    assert fd.classes == THING_CLASSES and fd.min_ratio == 0.75
    ref = fd.reference(x)
    assert ref.shape == (2, 48, 4, 4) and not ref.requires_grad
    assert fd(model.backbone(x)[-1], ref, label).item() == 0.0
    with torch.no_grad():
        model.backbone.norm4.weight.mul_(1.5)
    assert fd(model.backbone(x)[-1], fd.reference(x), label).item() > 0
    # the reference is the copy made at construction: unchanged by the edit
    assert torch.equal(fd.frozen.norm4.weight, torch.ones_like(fd.frozen.norm4.weight))


def test_gradients_reach_only_the_trained_backbone():
    model, x, label = _model_and_batch()
    fd = FeatureDistance(model.backbone)
    with torch.no_grad():
        for p in model.backbone.block4.parameters():
            p.add_(0.05 * torch.randn_like(p))
    res = model(x, label)  # the training forward hands back its backbone features
    loss = fd(res["features"][-1], fd.reference(x), label)
    assert loss.item() > 0
    loss.backward()
    assert all(not p.requires_grad and p.grad is None for p in fd.frozen.parameters())
    assert all(p.grad is None for p in model.decode_head.parameters())
    grads = {n: p.grad for n, p in model.backbone.named_parameters()}
    assert all(g is not None for g in grads.values())
    assert grads["norm4.weight"].abs().sum() > 0 and grads["patch_embed1.proj.weight"].abs().sum() > 0


def test_autocast_features_distance_in_fp32():
    model, x, label = _model_and_batch(64)
    fd = FeatureDistance(model.backbone, classes=[0, 13], min_ratio=0.5)
    with torch.no_grad():
        model.backbone.norm4.bias.add_(0.1)
    exact = fd(model.backbone(x)[-1], fd.reference(x), label)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feat, ref = model.backbone(x)[-1], fd.reference(x)
    assert ref.dtype == torch.bfloat16
    d = fd(feat, ref, label)
    assert d.dtype == torch.float32 and d.item() == pytest.approx(exact.item(), rel=0.05)
