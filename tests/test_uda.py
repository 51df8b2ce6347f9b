"""segmentation.uda against hand computations: the EMA teacher's ramp, the pseudo-label weight,
ClassMix masks and mixing, the strong augmentation, MIC's block masks; the weighted training loss."""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from segmentation.datasets import (DatasetError, MixedDataset, SegDataset, TargetSource, TrainSource, UDADataset,
                                   find_images, parse_image_spec)
from segmentation.models import build_segmentor
from segmentation.transforms import TrainPipeline
from segmentation.uda import (EMATeacher, StrongAugmentation, blur_kernel_size, block_mask, class_mix_masks,
                              color_jitter, ema_alpha, gaussian_blur, masked_consistency_input, mix, pseudo_labels)
from tests.test_seg_train import write_scenes


def test_ema_alpha_ramp():
    assert ema_alpha(1) == 0.5
    assert ema_alpha(2) == pytest.approx(2 / 3)
    assert ema_alpha(9) == pytest.approx(0.9)
    assert ema_alpha(999) == pytest.approx(0.999)  # 1 - 1/1000: where the ramp meets the cap
    assert ema_alpha(5000) == 0.999 and ema_alpha(5000, alpha=0.99) == 0.99


def test_teacher_follows_the_student_by_ema_on_parameters_only():
    student = nn.Sequential(nn.Linear(2, 1), nn.BatchNorm1d(1))
    teacher = EMATeacher(student)
    with torch.no_grad():
        student[0].weight.copy_(torch.tensor([[1.0, 2.0]]))
        student[0].bias.fill_(4.0)
    teacher.update(student, 0)  # step 0: a copy of the student
    assert torch.equal(teacher.model[0].weight, student[0].weight)
    with torch.no_grad():
        student[0].weight.copy_(torch.tensor([[3.0, 6.0]]))
        student[0].bias.fill_(0.0)
        student[1].running_mean.fill_(7.0)
    teacher.update(student, 1)  # alpha 1/2
    assert torch.allclose(teacher.model[0].weight, torch.tensor([[2.0, 4.0]]))
    assert torch.allclose(teacher.model[0].bias, torch.tensor([2.0]))
    with torch.no_grad():
        student[0].weight.zero_()
    teacher.update(student, 2)  # alpha 2/3: 2/3 * (2, 4) + 1/3 * 0
    assert torch.allclose(teacher.model[0].weight, torch.tensor([[4 / 3, 8 / 3]]))
    assert teacher.model[1].running_mean.item() == 0.0  # buffers are the teacher's own
    assert not any(p.requires_grad for p in teacher.model.parameters())


def test_teacher_predicts_in_training_mode_without_dropout():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Dropout2d(0.5))
    teacher = EMATeacher(model)
    x = torch.randn(2, 3, 5, 5)
    a, b = teacher(x), teacher(x)
    assert torch.equal(a, b)  # no dropout
    conv = teacher.model[0](x)
    mu, var = conv.mean((0, 2, 3), keepdim=True), conv.var((0, 2, 3), unbiased=False, keepdim=True)
    assert torch.allclose(a, (conv - mu) / torch.sqrt(var + 1e-5), atol=1e-5)  # batch statistics
    assert teacher.model[1].training and not teacher.model[2].training


def test_pseudo_label_weight_is_the_share_of_confident_pixels():
    # two classes: p_max = sigmoid(|d|); d = 4 -> 0.982 (>= 0.968), d = -3.5 -> 0.971, 3.4 -> 0.9677 (just below)
    d = torch.tensor([[[4.0, 3.0], [-3.5, 0.0]], [[-4.0, 1.0], [2.0, 3.4]]])  # (B=2, H=2, W=2)
    logits = torch.stack([torch.zeros_like(d), d], 1)  # class 1 wins where d > 0
    label, weight = pseudo_labels(logits)
    assert torch.equal(label, (d > 0).long())
    confident = [1 / (1 + math.exp(-abs(v))) >= 0.968 for v in d.flatten().tolist()]
    assert sum(confident) == 3  # 4.0, -3.5 and -4.0
    assert weight.shape == (2, 2, 2) and torch.allclose(weight, torch.full((2, 2, 2), 3 / 8))
    assert torch.allclose(pseudo_labels(logits, threshold=0.5)[1], torch.ones(2, 2, 2))


def test_class_mix_masks_paste_half_the_batch_classes_per_image():
    labels = torch.tensor([[[0, 0, 1, 1], [2, 2, 255, 255]],
                           [[0, 1, 2, 5], [5, 5, 0, 0]]])  # batch classes {0, 1, 2, 5, 255}: n = 5 -> 3 drawn
    g = torch.Generator().manual_seed(3)
    masks = class_mix_masks(labels, g)
    assert masks.shape == (2, 1, 2, 4) and masks.dtype == torch.bool
    expected_perm = torch.Generator().manual_seed(3)
    classes = torch.tensor([0, 1, 2, 5, 255])
    for i in range(2):
        chosen = classes[torch.randperm(5, generator=expected_perm)[:3]]
        assert torch.equal(masks[i, 0], torch.isin(labels[i], chosen))
        # the mask is a union of whole classes of the image
        for c in labels[i].unique():
            inside = masks[i, 0][labels[i] == c]
            assert inside.all() or not inside.any()
    even = class_mix_masks(torch.tensor([[[0, 1], [2, 3]]]), torch.Generator().manual_seed(0))
    assert int(even.sum()) == 2  # n = 4 -> 2 classes, one pixel each


def test_mix_images_labels_and_weights():
    mask = torch.tensor([[[[True, False], [False, True]]]])
    src, tgt = torch.ones(1, 3, 2, 2), torch.zeros(1, 3, 2, 2)
    assert torch.equal(mix(mask, src, tgt), mask.float().expand(1, 3, 2, 2))
    assert torch.equal(mix(mask, torch.tensor([[[7, 7], [7, 7]]]), torch.tensor([[[1, 2], [3, 4]]])),
                       torch.tensor([[[7, 2], [3, 7]]]))
    assert torch.equal(mix(mask, 1.0, torch.full((1, 2, 2), 0.25)), torch.tensor([[[1.0, 0.25], [0.25, 1.0]]]))


def test_block_mask_masks_blocks_at_the_ratio():
    g = torch.Generator().manual_seed(0)
    m = block_mask(2, 128, 192, block=64, ratio=0.7, generator=g)
    u = torch.rand(2, 1, 2, 3, generator=torch.Generator().manual_seed(0))  # the same draws, by hand
    assert m.shape == (2, 1, 128, 192)
    for by in range(2):
        for bx in range(3):
            cell = m[:, 0, by * 64:(by + 1) * 64, bx * 64:(bx + 1) * 64]
            for b in range(2):
                assert torch.all(cell[b] == float(u[b, 0, by, bx] > 0.7))
    big = block_mask(64, 512, 512, generator=torch.Generator().manual_seed(1))  # 4096 blocks of 64 px
    assert abs(1 - big.mean().item() - 0.7) < 0.03
    assert block_mask(1, 20, 20, block=64).shape == (1, 1, 20, 20)  # at least one block per axis
    x = torch.randn(2, 3, 128, 192)
    assert torch.equal(masked_consistency_input(x, m), x * m)


def test_color_jitter_operations_by_hand():
    x = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1).expand(1, 3, 2, 2).clone()  # pure red
    one, zero = torch.ones(1), torch.zeros(1)
    green = color_jitter(x, one, one, one, torch.tensor([1 / 3]), [3])  # hue turned by a third
    assert torch.allclose(green[0, :, 0, 0], torch.tensor([0.0, 1.0, 0.0]), atol=1e-6)
    grey = color_jitter(x, one, one, zero, zero, [2])  # no saturation: V everywhere
    assert torch.allclose(grey, torch.ones_like(x))
    half = torch.full((1, 3, 1, 1), 0.5)
    assert torch.allclose(color_jitter(half, torch.tensor([1.2]), one, one, zero, [0]), torch.full_like(half, 0.7))
    assert torch.allclose(color_jitter(half, one, torch.tensor([0.8]), one, zero, [1]), torch.full_like(half, 0.4))
    assert torch.allclose(color_jitter(x, torch.tensor([1.3]), one, one, zero, [0]), (x + 0.3).clamp(0, 1))


def test_gaussian_blur_kernel_and_values():
    assert [blur_kernel_size(n) for n in (512, 1024, 100, 95, 81, 32)] == [51, 103, 9, 9, 9, 3]
    x = torch.zeros(1, 1, 21, 21)
    x[0, 0, 10, 10] = 1.0  # an impulse: the blur is the normalised 3x3 Gaussian (21 px -> kernel 3)
    y = gaussian_blur(x, 1.0)
    w = torch.exp(-torch.tensor([1.0, 0.0, 1.0]) / 2)
    w = w / w.sum()
    assert torch.allclose(y[0, 0, 9:12, 9:12], w[:, None] * w[None, :], atol=1e-6)
    assert torch.allclose(gaussian_blur(torch.full((2, 3, 40, 50), 0.3), 0.7), torch.full((2, 3, 40, 50), 0.3))


def test_strong_augmentation_draws_and_identity():
    aug = StrongAugmentation()
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    u = torch.rand(2, generator=g2, dtype=torch.float64)
    assert aug.coins(g1) == (bool(u[0] > 0.2), bool(u[1] > 0.5))
    assert StrongAugmentation(blur=False).coins(torch.Generator().manual_seed(5))[1] is False
    x = torch.randn(2, 3, 16, 16)
    assert aug(x, jitter=False, blur=False) is x
    same = StrongAugmentation(jitter_strength=0.0)(x.clamp(-1.5, 1.5), jitter=True, blur=False,
                                                   generator=torch.Generator().manual_seed(0))
    assert torch.allclose(same, x.clamp(-1.5, 1.5), atol=1e-4)  # factors 1, hue 0: only the [0, 1] clamp
    a = aug(x, True, True, torch.Generator().manual_seed(1))
    b = aug(x, True, True, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, x)


@pytest.mark.parametrize("preset", ["tiny", "tiny_hrda"])
def test_weighted_training_loss(preset):
    torch.manual_seed(0)
    model = build_segmentor(preset).train()
    x = torch.randn(2, 3, 64, 64)
    y = torch.randint(0, 19, (2, 64, 64))
    y[:, :4] = 255

    def losses(weight):
        torch.manual_seed(1)  # the same HRDA detail crop every time
        with torch.no_grad():
            return model(x, y, seg_weight=weight)

    plain, ones, half, none = losses(None), losses(torch.ones(2, 64, 64)), losses(torch.full((2, 64, 64), 0.5)), \
        losses(torch.zeros(2, 64, 64))
    assert torch.allclose(plain["loss"], ones["loss"]) and torch.allclose(half["loss"], plain["loss"] / 2)
    assert none["loss"].item() == 0.0
    if preset == "tiny_hrda":  # the detail loss takes the weights inside its crop
        y1, y2, x1, x2 = plain["crop_box"]
        w = torch.zeros(2, 64, 64)
        w[:, y1:y2, x1:x2] = 1.0
        inside = losses(w)
        assert torch.allclose(inside["loss_hr"], plain["loss_hr"])
        assert inside["loss_fused"] < plain["loss_fused"]


# --------------------------------------------------------------------------------------------
# Target data
# --------------------------------------------------------------------------------------------
def _write_images(folder, names, size=(40, 56)):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in names:
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(folder / name)


def test_find_images_of_folders_manifests_and_layouts(tmp_path):
    _write_images(tmp_path / "plain" / "b", ["2.jpg", "1.png"])
    _write_images(tmp_path / "plain", ["0.png"])
    (tmp_path / "plain" / "notes.txt").write_text("not an image")
    assert [p.relative_to(tmp_path / "plain").as_posix() for p in find_images(tmp_path / "plain")] == \
        ["0.png", "b/1.png", "b/2.jpg"]
    # an unlabelled generation output: the manifest's images, in its order (a regenerated sample's last line wins)
    out = tmp_path / "didex"
    _write_images(out / "images", ["x.png", "y.png"])
    _write_images(out / "vis", ["x.png"])
    lines = [{"id": "y", "image": "images/y.png"}, {"id": "x", "image": "images/x.png"}]
    (out / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert [p.name for p in find_images(out)] == ["y.png", "x.png"]
    layout, path = parse_image_spec(f"gta:{tmp_path / 'plain'}")
    assert layout.name == "gta" and parse_image_spec(str(out)) == (None, out)
    # a layout's image folder, no labels needed
    _write_images(tmp_path / "gta" / "images", ["00001.png", "00000.png"])
    assert [p.name for p in find_images(tmp_path / "gta", "gta")] == ["00000.png", "00001.png"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images"):
        find_images(tmp_path / "empty")


def test_uda_dataset_pairs_the_mixture_with_target_draws(tmp_path):
    src = write_scenes(tmp_path / "src", 3, size=48)
    _write_images(tmp_path / "tgt", ["a.png", "b.png", "c.png"], size=(40, 72))
    pipe = TrainPipeline(scale=None, crop=32, photometric=False)
    mixed = MixedDataset([[TrainSource(SegDataset(src, "folder"), pipe)]], seed=3, rank=1)
    ds = UDADataset(mixed, [TargetSource(find_images(tmp_path / "tgt"), pipe)])
    a, b = ds[5], ds[5]
    assert torch.equal(a["image"], mixed[5]["image"]) and torch.equal(a["label"], mixed[5]["label"])
    assert torch.equal(a["target_image"], b["target_image"]) and a["target_image"].shape == (3, 32, 32)
    assert not torch.equal(ds[6]["target_image"], a["target_image"])
    rng = np.random.default_rng([3, 1, 5, 1])  # the target stream of item 5, by hand
    i = int(rng.integers(3))
    assert a["target_index"] == i
