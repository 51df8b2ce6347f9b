"""Segmentation data: metrics, dataset layouts and id mappings, augmentations, mixing, RCS, adherence."""
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segmentation import labels as L
from segmentation.adherence import main as adherence_main
from segmentation.adherence import score_samples, write_filtered
from segmentation.datasets import (LAYOUTS, DatasetError, MixedDataset, RCSConfig, SegDataset, TrainSource,
                                   find_pairs, parse_spec, read_manifest)
from segmentation.metrics import (accuracy_from_confusion, all_reduce_confusion, confusion_matrix,
                                  iou_from_confusion, mean_iou, summarize)
from segmentation.models import build_segmentor, save_segmentor
from segmentation.transforms import (IMAGENET_MEAN, IMAGENET_STD, TrainPipeline, denormalize, hsv_to_rgb,
                                     normalize, photometric_distortion, random_crop, rescale_size, rgb_to_hsv)


def png(path, array):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)
    return path


def rgb(h=8, w=12, value=0):
    return np.full((h, w, 3), value, dtype=np.uint8)


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------
def test_confusion_matrix_and_miou_by_hand():
    target = torch.tensor([[0, 0, 1, 255], [2, 2, 1, 1]])
    pred = torch.tensor([[0, 1, 1, 3], [2, 0, 1, 1]])  # the 3 sits on an ignored pixel
    cm = confusion_matrix(pred, target, num_classes=4)
    assert cm.tolist() == [[1, 1, 0, 0], [0, 3, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    iou = iou_from_confusion(cm)
    assert iou[:3].tolist() == pytest.approx([1 / 3, 3 / 4, 1 / 2])
    assert math.isnan(iou[3])  # in neither ground truth nor prediction: left out of the mean
    assert mean_iou(cm) == pytest.approx((1 / 3 + 3 / 4 + 1 / 2) / 3)
    aacc, acc = accuracy_from_confusion(cm)
    assert aacc == pytest.approx(5 / 7) and acc[:3].tolist() == pytest.approx([1 / 2, 1, 1 / 2])
    # a class predicted but absent from the ground truth has IoU 0 and counts (mmseg)
    pred2 = torch.tensor([[0, 0, 1, 0], [2, 3, 1, 1]])
    cm2 = confusion_matrix(pred2, target, num_classes=4)
    iou2 = iou_from_confusion(cm2)
    assert iou2.tolist() == pytest.approx([1.0, 1.0, 0.5, 0.0])
    assert mean_iou(cm2) == pytest.approx(2.5 / 4)
    s = summarize(cm2, class_names=["a", "b", "c", "d"])
    assert s["mIoU"] == pytest.approx(0.625) and s["IoU"]["d"] == 0.0 and s["pixels"] == 7
    assert summarize(cm, ["a", "b", "c", "d"])["IoU"]["d"] is None
    # dataset-level accumulation: sums of per-image matrices, not a mean of per-image mIoUs
    assert torch.equal(confusion_matrix(torch.stack([pred, pred2]), torch.stack([target, target]), 4), cm + cm2)
    # all ignore: empty matrix, NaN mIoU
    assert math.isnan(mean_iou(confusion_matrix(pred, torch.full_like(target, 255), 4)))


def test_confusion_matrix_checks_inputs():
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(torch.zeros(2, 3), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="predictions must be in"):
        confusion_matrix(torch.tensor([19]), torch.tensor([0]))


def _reduce_worker(rank, init_file, out):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    cm = confusion_matrix(torch.tensor([rank, 1, 2]), torch.tensor([0, 1, 2 if rank else 255]), 3)
    torch.save(all_reduce_confusion(cm), f"{out}{rank}.pt")
    dist.destroy_process_group()


def test_all_reduce_confusion_sums_over_two_gloo_processes(tmp_path):
    cm = confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 1]), 3)
    assert all_reduce_confusion(cm) is cm  # no process group: unchanged
    torch.multiprocessing.spawn(_reduce_worker, args=(str(tmp_path / "init"), str(tmp_path / "cm")), nprocs=2)
    expected = confusion_matrix(torch.tensor([0, 1, 1, 1, 2]), torch.tensor([0, 1, 0, 1, 2]), 3)
    for r in range(2):
        assert torch.equal(torch.load(tmp_path / f"cm{r}.pt"), expected)


# --------------------------------------------------------------------------------------------
# Layouts and mappings
# --------------------------------------------------------------------------------------------
# The id -> trainId tables of SegModel's tools/convert_datasets scripts, written out again independently.
CITYSCAPES_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                  26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
MAPILLARY_IDS = {13: 0, 24: 0, 41: 0, 2: 1, 15: 1, 17: 2, 6: 3, 3: 4, 45: 5, 47: 5, 48: 6, 50: 7, 30: 8, 29: 9,
                 27: 10, 19: 11, 20: 12, 21: 12, 22: 12, 55: 13, 61: 14, 54: 15, 58: 16, 57: 17, 52: 18}


def raw_and_expected(table, n=66):
    raw = np.arange(n, dtype=np.uint8).reshape(6, 11)
    return raw, np.vectorize(lambda v: table.get(int(v), 255))(raw).astype(np.uint8)


def test_gta_raw_and_converted_layouts(tmp_path):
    raw, expected = raw_and_expected(CITYSCAPES_IDS)
    for stem in ("00001", "00002"):
        png(tmp_path / "images" / f"{stem}.png", rgb(6, 11))
        png(tmp_path / "labels" / f"{stem}.png", raw)
    ds = SegDataset(tmp_path, "gta_raw")
    assert [p[0].name for p in ds.pairs] == ["00001.png", "00002.png"]
    assert np.array_equal(ds.load(0)[1], expected)
    with pytest.raises(DatasetError, match="2 image.*without a label.*_labelTrainIds.png"):
        find_pairs(tmp_path, "gta")
    L.convert_folder(tmp_path / "labels", "gta")
    conv = SegDataset(tmp_path, "gta")
    assert [p[1].name for p in conv.pairs] == ["00001_labelTrainIds.png", "00002_labelTrainIds.png"]
    assert np.array_equal(conv.load(1)[1], expected)
    assert len(find_pairs(tmp_path, "gta_raw")) == 2  # the converted files are not raw labels
    # GTA has a few label/image size mismatches: the label is resized to the image
    png(tmp_path / "images" / "00003.png", rgb(12, 22))
    png(tmp_path / "labels" / "00003_labelTrainIds.png", np.zeros((6, 11)))
    image, label = SegDataset(tmp_path, "gta").load(2)
    assert image.shape[:2] == label.shape == (12, 22)


def test_cityscapes_layout_nested_cities(tmp_path):
    raw, expected = raw_and_expected(CITYSCAPES_IDS)
    for split, cities in (("train", ["aachen", "bremen"]), ("val", ["lindau"])):
        for city in cities:
            stem = f"{city}_000000_000019"
            png(tmp_path / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", rgb(6, 11))
            png(tmp_path / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", raw)
            png(tmp_path / "gtFine" / split / city / f"{stem}_gtFine_color.png", rgb(6, 11, 9))
    pairs = find_pairs(tmp_path, "cityscapes_raw", "train")
    assert [p[0].parent.name for p in pairs] == ["aachen", "bremen"]
    assert np.array_equal(SegDataset(tmp_path, "cityscapes_raw", "val").load(0)[1], expected)
    with pytest.raises(DatasetError, match="without a label"):
        find_pairs(tmp_path, "cityscapes", "val")  # not converted yet
    L.convert_folder(tmp_path / "gtFine", "cityscapes", recursive=True)
    ds = SegDataset(tmp_path, "cityscapes")  # default split: val
    assert len(ds) == 1 and np.array_equal(ds.load(0)[1], expected)
    item = ds[0]  # evaluation item: image resized to 1024x512 (keep ratio), label at full size
    assert item["image"].shape == (3, 512, 939) and item["label"].shape == (6, 11)


def test_mapillary_layout_uses_its_lut(tmp_path):
    raw, expected = raw_and_expected(MAPILLARY_IDS)
    png(tmp_path / "validation" / "images" / "a1.jpg", rgb(6, 11))
    png(tmp_path / "validation" / "labels" / "a1.png", raw)
    ds = SegDataset(tmp_path, "mapillary_raw", "val")
    assert np.array_equal(ds.load(0)[1], expected)
    assert expected[raw == 41][0] == 0 and expected[raw == 47][0] == 5 and expected[raw == 22][0] == 12
    assert expected[raw == 65][0] == 255 and expected[raw == 7][0] == 255  # 7 is road in Cityscapes ids
    L.convert_folder(tmp_path / "validation" / "labels", "mapillary")
    assert np.array_equal(SegDataset(tmp_path, "mapillary").load(0)[1], expected)


def test_bdd_acdc_darkzurich_layouts(tmp_path):
    lab = np.array([[0, 1, 255], [18, 5, 2]], dtype=np.uint8)
    png(tmp_path / "bdd" / "images" / "10k" / "val" / "x1.jpg", rgb(2, 3))
    png(tmp_path / "bdd" / "labels" / "sem_seg" / "masks" / "val" / "x1.png", lab)
    assert np.array_equal(SegDataset(tmp_path / "bdd", "bdd100k").load(0)[1], lab)
    # ACDC as shipped (condition/split/sequence) and flattened (split/...) both work
    for root, sub in ((tmp_path / "acdc", "fog/val/GOPR0475"), (tmp_path / "acdc_flat", "val")):
        png(root / "rgb_anon" / sub / "GOPR0475_frame_000041_rgb_anon.png", rgb(2, 3))
        png(root / "gt" / sub / "GOPR0475_frame_000041_gt_labelTrainIds.png", lab)
        png(root / "rgb_anon" / sub.replace("val", "train") / "t_rgb_anon.png", rgb(2, 3))
        png(root / "gt" / sub.replace("val", "train") / "t_gt_labelTrainIds.png", lab)
        png(root / "rgb_anon" / sub.replace("val", "val_ref") / "r_rgb_anon.png", rgb(2, 3))  # no GT: not val
        ds = SegDataset(root, "acdc")
        assert len(ds) == 1 and np.array_equal(ds.load(0)[1], lab)
        assert ds.layout.test_scale == (960, 540)
    png(tmp_path / "dz" / "rgb_anon" / "val" / "night" / "GOPR0356" / "f_rgb_anon.png", rgb(2, 3))
    png(tmp_path / "dz" / "gt" / "val" / "night" / "GOPR0356" / "f_gt_labelTrainIds.png", lab)
    layout, path = parse_spec(f"dark_zurich:{tmp_path / 'dz'}")
    assert layout is LAYOUTS["dark_zurich"] and len(find_pairs(path, layout)) == 1


def test_layout_errors_are_clear(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        find_pairs(tmp_path / "nope", "gta")
    png(tmp_path / "images" / "a.png", rgb())
    with pytest.raises(DatasetError, match=r"label folder .*labels does not exist"):
        find_pairs(tmp_path, "folder")
    png(tmp_path / "labels" / "a_labelTrainIds.png", np.zeros((8, 12)))
    png(tmp_path / "labels" / "orphan_labelTrainIds.png", np.zeros((8, 12)))
    png(tmp_path / "images" / "b.jpg", rgb())
    with pytest.raises(DatasetError) as e:
        find_pairs(tmp_path, "folder")
    assert "1 image(s) without a label" in str(e.value) and "b.jpg" in str(e.value)
    assert "1 label(s) without an image" in str(e.value) and "orphan_labelTrainIds.png" in str(e.value)
    with pytest.warns(UserWarning, match="unpaired"):
        assert [p[0].name for p in find_pairs(tmp_path, "folder", strict=False)] == ["a.png"]
    png(tmp_path / "labels" / "b.png", np.full((8, 12), 42))  # plain .png label, bad value
    png(tmp_path / "images" / "orphan.png", rgb())
    ds = SegDataset(tmp_path, "folder")
    assert [p[1].name for p in ds.pairs] == ["a_labelTrainIds.png", "b.png", "orphan_labelTrainIds.png"]
    with pytest.raises(L.LabelError, match=r"b\.png.*42"):
        ds.load(1)
    png(tmp_path / "labels" / "a_labelTrainIds.png", np.zeros((4, 4)))
    with pytest.raises(L.LabelError, match="differs from its image"):
        ds.load(0)
    with pytest.raises(DatasetError, match="must be LAYOUT:PATH"):
        parse_spec("kitti:/x")


def write_generated(root, n, cls=13, size=16, value=200, torn=False):
    """A DGInStyle output folder as mrlf.generate writes it (labels in labels/, manifest.jsonl)."""
    lines = []
    for i in range(n):
        sid = f"{i:06d}"
        png(Path(root) / "images" / f"{sid}.png", rgb(size, size, value))
        png(Path(root) / "labels" / f"{sid}_labelTrainIds.png", np.full((size, size), cls))
        lines.append(json.dumps({"id": sid, "index": i, "image": f"images/{sid}.png",
                                 "label": f"labels/{sid}_labelTrainIds.png", "prompt": "x"}))
    text = "\n".join(lines) + "\n" + ('{"id": "torn", "ima' if torn else "")
    (Path(root) / "manifest.jsonl").write_text(text)


def test_dginstyle_manifest_layout(tmp_path):
    write_generated(tmp_path, 3, torn=True)
    with pytest.warns(UserWarning, match="skipping 1 incomplete line"):
        pairs = find_pairs(tmp_path, "dginstyle")
    assert [p[0].name for p in pairs] == ["000000.png", "000001.png", "000002.png"]
    with open(tmp_path / "manifest.jsonl", "a") as f:  # resumed after the tear; sample 1 regenerated
        f.write("\n" + json.dumps({"id": "000001", "image": "images/000001.png",
                                   "label": "labels/000001_labelTrainIds.png", "prompt": "again"}) + "\n")
    with pytest.warns(UserWarning, match="line 4"):
        records = read_manifest(tmp_path)
    assert [r["id"] for r in records] == ["000000", "000002", "000001"] and records[-1]["prompt"] == "again"
    os.remove(tmp_path / "labels" / "000002_labelTrainIds.png")
    with pytest.raises(DatasetError, match="missing.*000002_labelTrainIds.png"), pytest.warns(UserWarning):
        find_pairs(tmp_path, "dginstyle")
    with pytest.raises(DatasetError, match="no manifest.jsonl"):
        find_pairs(tmp_path / "images", "dginstyle")


# --------------------------------------------------------------------------------------------
# Augmentations
# --------------------------------------------------------------------------------------------
def test_resize_scale_like_mmcv():
    assert rescale_size((1052, 1914), (1280, 720)) == (704, 1280)  # GTA -> fits 1280 x 720
    assert rescale_size((1024, 2048), (1024, 512)) == (512, 1024)  # Cityscapes test scale
    assert rescale_size((1080, 1920), (960, 540)) == (540, 960)  # ACDC
    assert rescale_size((720, 1280), (1024, 512)) == (512, 910)  # BDD100K


def test_random_crop_cat_max_ratio_and_determinism():
    label = np.zeros((64, 64), dtype=np.uint8)
    label[:, 56:] = 1  # only crops reaching the right strip hold two classes
    image = np.zeros((64, 64, 3), dtype=np.uint8)

    def share(cat_max_ratio, n=400):
        ok = 0
        for seed in range(n):
            _, crop = random_crop(image, label, 16, np.random.default_rng(seed), cat_max_ratio=cat_max_ratio)
            counts = np.bincount(crop.ravel(), minlength=2)
            ok += counts.max() / counts.sum() < 0.75
        return ok / n

    # one uniform draw passes when x1 is 44..48 (p = 5/49); mmseg checks up to 10 re-draws, then
    # keeps the 11th unchecked: 1 - (44/49)^11 = 0.69
    assert abs(share(0.75) - (1 - (44 / 49) ** 11)) < 0.08
    assert abs(share(1.0) - 5 / 49) < 0.05
    a = random_crop(image, label, 16, np.random.default_rng(3))[1]
    assert np.array_equal(a, random_crop(image, label, 16, np.random.default_rng(3))[1])
    # void does not count as a class; smaller images are not cropped
    small = np.full((8, 8), 255, np.uint8)
    assert random_crop(image[:8, :8], small, 16, np.random.default_rng(0))[1].shape == (8, 8)


def test_train_pipeline_output():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (40, 80, 3), dtype=np.uint8)
    label = rng.integers(0, 19, (40, 80), dtype=np.uint8)
    pipe = TrainPipeline(scale=(40, 20), crop=32, photometric=False, flip_prob=0.0)
    img, lab = pipe(image, label, np.random.default_rng(1))
    assert img.shape == (3, 32, 32) and lab.shape == (32, 32) and lab.dtype == torch.int64
    assert (lab[20:] == 255).all() and (lab[:20] != 255).all()  # resized to 20 x 40, padded with 255
    assert (img[:, 20:] == 0).all()  # image padded with 0 after normalisation
    flip = TrainPipeline(scale=None, crop=(40, 80), photometric=False, flip_prob=1.0)
    img, lab = flip(image, label, np.random.default_rng(0))
    assert np.array_equal(lab.numpy(), label[:, ::-1]) and np.array_equal(denormalize(img), image[:, ::-1])
    full = TrainPipeline(scale=(80, 40), crop=32)
    a, b = full(image, label, np.random.default_rng(5)), full(image, label, np.random.default_rng(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_normalize_and_photometric_distortion():
    img = np.array([[[123, 116, 103], [255, 0, 0]]], dtype=np.uint8)
    t = normalize(img)
    assert t[:, 0, 0].tolist() == pytest.approx([(v - m) / s for v, m, s in zip([123, 116, 103], IMAGENET_MEAN, IMAGENET_STD)], abs=1e-6)
    rgbs = np.random.default_rng(0).integers(0, 256, (500, 3)).astype(np.float32)
    np.testing.assert_allclose(hsv_to_rgb(rgb_to_hsv(rgbs)), rgbs, atol=1e-3)
    assert rgb_to_hsv(np.array([[255.0, 0, 0], [0, 255, 0], [0, 0, 255]]))[:, 0].tolist() == [0, 120, 240]
    image = np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    changed, outs = 0, []
    for seed in range(20):
        out = photometric_distortion(image, np.random.default_rng(seed))
        assert out.shape == image.shape and out.dtype == np.uint8
        changed += not np.array_equal(out, image)
        outs.append(out)
    assert changed >= 15  # each of 4 steps fires with p 1/2: all skipped in 1/16 of the draws
    # brightness only: shifts by at most 32
    class Coins:  # brightness on, everything else off
        def __init__(self):
            self.calls = 0

        def integers(self, *a):
            self.calls += 1
            return 1 if self.calls == 1 else 0

        def uniform(self, lo, hi):
            return hi

    out = photometric_distortion(np.full((2, 2, 3), 100, np.uint8), Coins())
    assert (out == 132).all()


# --------------------------------------------------------------------------------------------
# Mixing and rare-class sampling
# --------------------------------------------------------------------------------------------
def write_source(root, n, cls=0, size=16, value=50):
    for i in range(n):
        png(Path(root) / "images" / f"s{i}.png", rgb(size, size, value))
        png(Path(root) / "labels" / f"s{i}_labelTrainIds.png", np.full((size, size), cls))


def _sources(tmp_path, n_src=3, n_gen=9):
    write_source(tmp_path / "src", n_src, cls=0)
    write_generated(tmp_path / "gen", n_gen, cls=13)
    pipe = TrainPipeline(scale=None, crop=16, photometric=False)
    src = TrainSource(SegDataset(tmp_path / "src", "folder"), pipe)
    gen = TrainSource(SegDataset(tmp_path / "gen", "dginstyle"), pipe)
    return src, gen


def _share(ds, n):
    groups, files = [], set()
    for k in range(n):
        item = ds[k]
        cls = int(item["label"][0, 0])
        assert cls == (13 if item["group"] == 1 else 0)  # the data really comes from that group's files
        groups.append(item["group"])
        files.add((item["group"], item["index"]))
    return np.mean(groups), files


@pytest.mark.parametrize("ratio,p_gen", [(None, 9 / 12), ("1:1", 0.5), ("3:1", 0.25), ([0, 1], 1.0)])
def test_mixing_draws_from_both_in_the_requested_ratio(tmp_path, ratio, p_gen):
    src, gen = _sources(tmp_path)
    ds = MixedDataset([[src], [gen]], ratio, seed=7)
    n = 1500
    share, files = _share(ds, n)
    sigma = math.sqrt(p_gen * (1 - p_gen) / n)
    assert abs(share - p_gen) <= 4.5 * sigma + 1e-12
    if 0 < p_gen < 1:
        assert {g for g, _ in files} == {0, 1} and len(files) == 12  # every file of both sets is read


def test_mixing_is_per_item_deterministic_and_per_rank(tmp_path):
    src, gen = _sources(tmp_path)
    a = MixedDataset([[src], [gen]], seed=1, rank=0)
    b = MixedDataset([[src], [gen]], seed=1, rank=1)
    seq = lambda ds: [(ds[k]["group"], ds[k]["index"]) for k in range(40)]  # noqa: E731
    assert seq(a) == seq(MixedDataset([[src], [gen]], seed=1, rank=0))
    assert a[17]["group"] == a[17]["group"] and seq(a) != seq(b)
    with pytest.raises(ValueError, match="ratio"):
        MixedDataset([[src], [gen]], "1:2:3")
    only = MixedDataset([[src], []], "1:1")  # no generated data: a ratio cannot pick it
    assert all(only[k]["group"] == 0 for k in range(20))


def test_rare_class_sampling_on_the_source_set(tmp_path):
    for i in range(10):  # 9 files of road/building; 1 with a traffic light patch
        lab = np.zeros((32, 64), np.uint8)
        lab[:16] = 2
        if i == 7:
            lab[2:12, 40:50] = 6
        png(tmp_path / "images" / f"{i:05d}.png", rgb(32, 64))
        png(tmp_path / "labels" / f"{i:05d}_labelTrainIds.png", lab)
    ds = SegDataset(tmp_path, "gta")
    pipe = TrainPipeline(scale=None, crop=16, cat_max_ratio=1.0, photometric=False, flip_prob=0.0)
    rcs = TrainSource(ds, pipe, RCSConfig(temperature=0.01, min_pixels=50, min_crop_ratio=0.5))
    plain = TrainSource(ds, pipe)
    assert (tmp_path / "labels" / "rcs_class_stats.json").is_file()  # rcs.py's cache
    rng = np.random.default_rng(0)
    picks = [rcs.draw(rng) for _ in range(200)]
    hits = [i for _, _, i in picks].count(7)
    assert hits > 60  # uniform: ~20; class probs give the rare class ~1/3 (3 classes, T=0.01)
    with_light = [int((lab == 6).sum()) for _, lab, i in picks if i == 7]
    assert np.mean([n > 25 for n in with_light]) > 0.9  # re-cropped until > 50 * 0.5 pixels of it
    rng = np.random.default_rng(0)
    assert sum(plain.draw(rng)[2] == 7 for _ in range(200)) < 45
    raw = SegDataset(tmp_path, "gta_raw", pairs=ds.pairs)
    with pytest.raises(DatasetError, match="convert"):
        TrainSource(raw, pipe, RCSConfig())


# --------------------------------------------------------------------------------------------
# Label adherence
# --------------------------------------------------------------------------------------------
class PaletteModel(torch.nn.Module):
    """A perfect segmentor for label-coloured images: the class whose palette colour is nearest."""

    def forward(self, x):
        img = torch.stack([torch.from_numpy(denormalize(i)).permute(2, 0, 1).float() for i in x])
        pal = torch.from_numpy(L.PALETTE).float()  # (19, 3)
        d = ((img[:, None] - pal[None, :, :, None, None]) ** 2).sum(2)
        return -d


def test_adherence_perfect_model_and_filtering(tmp_path):
    from segmentation.synthetic import street_scene
    lines = []
    for i in range(3):
        lab = street_scene(32, 48, seed=i)
        image = L.colorize(lab)
        drawn = lab if i != 1 else np.roll(lab, 24, axis=1)  # sample 1: the image drifted from its label
        png(tmp_path / "images" / f"{i}.png", L.colorize(drawn) if i == 1 else image)
        png(tmp_path / "labels" / f"{i}_labelTrainIds.png", lab)
        lines.append(json.dumps({"id": str(i), "image": f"images/{i}.png", "label": f"labels/{i}_labelTrainIds.png"}))
    (tmp_path / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    records = read_manifest(tmp_path)
    ds = SegDataset(tmp_path, "dginstyle", test_scale=None)
    res = score_samples(PaletteModel(), ds, [r["id"] for r in records])
    scores = {s["id"]: s["mIoU"] for s in res["samples"]}
    assert scores["0"] == 1.0 and scores["2"] == 1.0 and scores["1"] < 0.6
    kept = write_filtered(records, res["samples"], 0.9, tmp_path / "filtered.jsonl")
    assert kept == 2
    assert [json.loads(x)["id"] for x in (tmp_path / "filtered.jsonl").read_text().splitlines()] == ["0", "2"]


def test_adherence_cli_writes_report_and_filtered_manifest(tmp_path):
    write_generated(tmp_path / "gen", 3, size=32)
    ckpt = save_segmentor(build_segmentor("tiny"), tmp_path / "m.safetensors")
    rc = adherence_main(["--checkpoint", str(ckpt), "--generated", str(tmp_path / "gen"), "--device", "cpu",
                         "--min-miou", "0", "--write-filtered", str(tmp_path / "keep.jsonl")])
    assert rc == 0
    report = json.loads((tmp_path / "gen" / "adherence.json").read_text())
    assert [s["id"] for s in report["samples"]] == ["000000", "000001", "000002"]
    assert all(0.0 <= s["mIoU"] <= 1.0 for s in report["samples"])
    assert len((tmp_path / "gen" / "adherence.csv").read_text().splitlines()) == 4
    assert len((tmp_path / "keep.jsonl").read_text().splitlines()) == 3
    adherence_main(["--checkpoint", str(ckpt), "--generated", str(tmp_path / "gen"), "--device", "cpu",
                    "--min-miou", "1.01", "--write-filtered", str(tmp_path / "none.jsonl")])
    assert (tmp_path / "none.jsonl").read_text() == ""


def test_evaluate_cli_table_and_json(tmp_path, capsys):
    from segmentation.evaluate import format_table
    from segmentation.evaluate import main as evaluate_main
    lab = np.zeros((24, 48), np.uint8)
    lab[12:] = 2
    lab[:, :4] = 255
    for city in ("lindau", "munster"):
        png(tmp_path / "cs" / "leftImg8bit" / "val" / city / f"{city}_1_leftImg8bit.png", rgb(24, 48))
        png(tmp_path / "cs" / "gtFine" / "val" / city / f"{city}_1_gtFine_labelTrainIds.png", lab)
    png(tmp_path / "acdc" / "rgb_anon" / "val" / "a_rgb_anon.png", rgb(24, 48))
    png(tmp_path / "acdc" / "gt" / "val" / "a_gt_labelTrainIds.png", lab)
    ckpt = save_segmentor(build_segmentor("tiny"), tmp_path / "m.safetensors")
    out = tmp_path / "res.json"
    evaluate_main(["--checkpoint", str(ckpt), "--dataset", f"cityscapes:{tmp_path / 'cs'}", f"acdc:{tmp_path / 'acdc'}",
                   "--crop", "32", "--stride", "16", "--test-scale", "64", "32", "--device", "cpu", "--out", str(out)])
    res = json.loads(out.read_text())
    assert set(res["results"]) == {"cityscapes", "acdc"} and res["datasets"]["cityscapes"]["images"] == 2
    cs = res["results"]["cityscapes"]
    cm = torch.tensor(cs["confusion_matrix"])
    assert cm.sum() == 2 * 44 * 24 and cm.sum(1)[0] == 2 * 44 * 12  # void not scored; full-size labels
    assert cs["mIoU"] == pytest.approx(mean_iou(cm))
    printed = capsys.readouterr().out
    assert "road" in printed and "mIoU" in printed and f"{100 * cs['mIoU']:.1f}" in printed
    table = format_table({"x": {"mIoU": 0.51234, "IoU": {"road": 0.9876, "sidewalk": None}}})
    assert "98.8" in table and "51.2" in table and "-" in table.splitlines()[3]


def test_evaluate_and_adherence_show_progress(tmp_path, capsys):
    from segmentation.evaluate import main as evaluate_main

    write_generated(tmp_path / "gen", 3, size=32)
    ckpt = save_segmentor(build_segmentor("tiny"), tmp_path / "m.safetensors")
    evaluate_main(["--checkpoint", str(ckpt), "--dataset", f"dginstyle:{tmp_path / 'gen'}", "--mode", "whole",
                   "--device", "cpu", "--out", str(tmp_path / "res.json")])
    err = capsys.readouterr().err
    assert "dginstyle: 3/3 images (100%)" in err and "ETA" in err and "\r" not in err  # a log gets lines
    adherence_main(["--checkpoint", str(ckpt), "--generated", str(tmp_path / "gen"), "--device", "cpu"])
    assert "adherence: 3/3 samples (100%)" in capsys.readouterr().err
    adherence_main(["--checkpoint", str(ckpt), "--generated", str(tmp_path / "gen"), "--device", "cpu",
                    "--no-progress"])
    assert "samples (100%)" not in capsys.readouterr().err
