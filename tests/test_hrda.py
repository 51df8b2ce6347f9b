"""HRDA multi-resolution segmentor: crop boxes, fusion, losses, hr slide inference, weight files,
training and evaluation, on tiny CPU configs (mit_tiny, 64 crops, detail crop 32)."""
import json
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from segmentation.datasets import SegDataset
from segmentation.evaluate import default_window, evaluate_dataset, is_hr_model, predict_logits, slide_logits
from segmentation.labels import colorize
from segmentation.models import (PRESETS, HRDAConfig, HRDASegmentor, MixVisionTransformer, Segmentor,
                                 SegmentorConfig, build_segmentor, export_pretrained, load_segmentor,
                                 save_segmentor)
from segmentation.models.heads import ASPPWrapper, ConvBNReLU
from segmentation.models.hrda import get_crop_box, slide_boxes
from segmentation.synthetic import street_scene


def tiny(dropout=0.0, **hrda):
    cfg = PRESETS["tiny_hrda"]
    return build_segmentor(replace(cfg, dropout=dropout, hrda=replace(cfg.hrda, **hrda)))


def up(x, s=2.0):
    return F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)


def manual_parts(m, x, box):
    """Context logits, attention (sigmoid, unmasked) and detail logits, computed module by module."""
    lr_feats = m.backbone(F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False))
    y1, y2, x1, x2 = box
    hr = m.decode_head.head(m.backbone(x[..., y1:y2, x1:x2]))
    lr = m.decode_head.head(lr_feats)
    att = torch.sigmoid(m.decode_head.scale_attention(lr_feats)) if m.decode_head.scale_attention is not None else None
    return lr, att, hr


def box_mask(shape, box, s):
    y1, y2, x1, x2 = (v // s for v in box)
    mask = torch.zeros(shape[-2:], dtype=torch.bool)
    mask[y1:y2, x1:x2] = True
    return mask


def batch(n=2, size=64, seed=0):
    labs = np.stack([street_scene(size, size, seed=[seed, i]) for i in range(n)])
    rng = np.random.default_rng(seed)
    imgs = np.clip(np.stack([colorize(lab) for lab in labs]) + rng.normal(0, 10, labs.shape + (3,)), 0, 255)
    x = (torch.from_numpy(imgs).float().permute(0, 3, 1, 2) - 128) / 64
    return x, torch.from_numpy(labs).long()


# --------------------------------------------------------------------------------------------
# Crop boxes
# --------------------------------------------------------------------------------------------
def test_crop_boxes_are_divisible_inside_and_drawn_like_hrda():
    g = torch.Generator().manual_seed(0)
    boxes = [get_crop_box(64, 96, (32, 32), 8, g) for _ in range(600)]
    ys, xs = {b[0] for b in boxes}, {b[2] for b in boxes}
    # HRDA draws offsets in [0, (margin + 1) // d) * d: the last multiple (the margin) is never used
    assert ys == {0, 8, 16, 24} and xs == {0, 8, 16, 24, 32, 40, 48, 56}
    assert all(y2 - y1 == 32 and x2 - x1 == 32 and y2 <= 64 and x2 <= 96 for y1, y2, x1, x2 in boxes)
    exp61 = [get_crop_box(1024, 1024, (512, 512), 8, g) for _ in range(300)]
    assert all(b[0] % 8 == 0 and b[2] % 8 == 0 and b[1] <= 1024 and b[3] <= 1024 for b in exp61)
    assert max(b[0] for b in exp61) <= 504
    assert {get_crop_box(40, 40, (32, 32), 1, g)[0] for _ in range(400)} == set(range(9))  # 0..margin
    assert get_crop_box(32, 32, (32, 32), 8, g) == (0, 32, 0, 32)
    assert get_crop_box(32, 48, (32, 32), 8, g)[:2] == (0, 32)  # no margin along one axis
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert get_crop_box(64, 64, (32, 32), 8, g1) == get_crop_box(64, 64, (32, 32), 8, g2)


# --------------------------------------------------------------------------------------------
# Training forward: shapes, fusion, attention, losses
# --------------------------------------------------------------------------------------------
def test_training_forward_shapes_and_manual_fusion():
    m = tiny().eval()  # eval: BN running stats, so the module-by-module recomputation is exact
    x, y = batch()
    out = m.forward_train(x, y, generator=torch.Generator().manual_seed(1))
    box = out["crop_box"]
    assert all(v % 8 == 0 for v in box) and box[1] - box[0] == 32 and box[3] - box[2] == 32
    assert out["logits"].shape == (2, 19, 16, 16)  # output grid: 1/4 of the 64 crop
    assert out["hr_logits"].shape == (2, 19, 8, 8)  # detail: 1/4 of the 32 crop
    assert out["lr_logits"].shape == out["attention"].shape == (2, 19, 8, 8)  # context: 1/4 of 32
    assert [f.shape[-1] for f in out["features"]] == [8, 4, 2, 1]  # feature_scale 0.5: the context
    for f, g in zip(out["features"], m.extract_feat(x)):  # what a frozen copy is given for the FD
        torch.testing.assert_close(f, g)
    lr, att, hr = manual_parts(m, x, box)
    inside = box_mask(lr.shape, box, 8)
    att_masked = att * inside
    placed = torch.zeros(2, 19, 16, 16)
    placed[:, :, box[0] // 4:box[1] // 4, box[2] // 4:box[3] // 4] = hr
    fused = up(att_masked) * placed + up((1 - att_masked) * lr)
    torch.testing.assert_close(out["hr_logits"], hr)
    torch.testing.assert_close(out["attention"], att_masked)
    torch.testing.assert_close(out["lr_logits"], (1 - att_masked) * lr)
    torch.testing.assert_close(out["logits"], fused)
    # attention outside the detail crop is 0 (at the context resolution), so there the fused
    # prediction is the upsampled context, except one output cell along the box edge, where
    # the bilinear upsampling of the masked attention leaks in (as in HRDA)
    assert (out["attention"][..., ~inside] == 0).all() and (out["attention"][..., inside] > 0).all()
    far = ~F.max_pool2d(box_mask((16, 16), box, 4)[None].float(), 3, 1, 1)[0].bool()
    assert far.any()
    torch.testing.assert_close(out["logits"][..., far], up(lr)[..., far])
    edge = box_mask((16, 16), box, 4) ^ ~far
    assert not torch.allclose(out["logits"][..., edge], up(lr)[..., edge])


def mmseg_ce(logits, label):
    """mmseg's CE: ignored pixels count as 0 in a mean over all pixels."""
    return F.cross_entropy(logits, label, ignore_index=255, reduction="none").mean()


def test_loss_is_hrda_weighted_fused_plus_detail_ce():
    m = tiny().train()
    x, y = batch()
    y[0, :5] = 255  # ignored pixels
    out = m(x, y, generator=torch.Generator().manual_seed(2))  # forward(x, label) = forward_train
    box = out["crop_box"]
    fused_up = F.interpolate(out["logits"], size=(64, 64), mode="bilinear")
    ce_fused = mmseg_ce(fused_up, y)
    ce_hr = mmseg_ce(F.interpolate(out["hr_logits"], size=(32, 32), mode="bilinear"), y[:, box[0]:box[1], box[2]:box[3]])
    torch.testing.assert_close(out["loss_fused"], ce_fused)
    assert not torch.allclose(out["loss_fused"], F.cross_entropy(fused_up, y, ignore_index=255))  # not a valid-pixel mean
    torch.testing.assert_close(out["loss_hr"], ce_hr)
    # HRDAHead.losses: loss_seg *= 1 - hr_loss_weight, hr.loss_seg *= hr_loss_weight
    torch.testing.assert_close(out["loss"], 0.9 * ce_fused + 0.1 * ce_hr)
    assert not torch.allclose(out["loss"], ce_fused + 0.1 * ce_hr)
    out["loss"].backward()
    assert all(p.grad is not None for p in m.parameters())  # every module takes part (DDP-safe)
    m2 = tiny(lr_loss_weight=0.2).train()
    o = m2(x, y, generator=torch.Generator().manual_seed(2))
    ce_lr = mmseg_ce(F.interpolate(o["lr_logits"], size=(64, 64), mode="bilinear"), y)
    torch.testing.assert_close(o["loss"], 0.7 * o["loss_fused"] + 0.2 * ce_lr + 0.1 * o["loss_hr"])


@pytest.mark.parametrize("value", [1.0, 0.0])
def test_forced_attention_gives_the_detail_or_the_context(value):
    x, y = batch()
    fixed = tiny(fixed_attention=value).eval()
    assert fixed.decode_head.scale_attention is None
    learned = tiny().eval()  # the learned head driven to sigmoid = 1 / 0 exactly
    sa = learned.decode_head.scale_attention
    with torch.no_grad():
        sa.conv_seg.weight.zero_()
        sa.conv_seg.bias.fill_(1e4 if value else -1e4)
    for m in (fixed, learned):
        out = m.forward_train(x, y, generator=torch.Generator().manual_seed(5))
        box = out["crop_box"]
        lr, _, hr = manual_parts(m, x, box)
        ctx = up(lr)
        if value == 0:
            torch.testing.assert_close(out["logits"], ctx)  # everywhere
            inf = m(x)
            torch.testing.assert_close(inf, F.interpolate(up(m.decode_head.head(m.backbone(
                F.interpolate(x, scale_factor=0.5, mode="bilinear"))), 2), size=(64, 64), mode="bilinear"))
        else:
            placed = torch.zeros_like(ctx)
            placed[:, :, box[0] // 4:box[1] // 4, box[2] // 4:box[3] // 4] = hr
            core = box_mask((16, 16), box, 4)
            core = F.avg_pool2d(core[None].float(), 3, 1, 1, count_include_pad=False)[0] == 1  # 1-cell border off
            far = ~F.max_pool2d(box_mask((16, 16), box, 4)[None].float(), 3, 1, 1)[0].bool()
            torch.testing.assert_close(out["logits"][..., core], placed[..., core])  # the detail
            torch.testing.assert_close(out["logits"][..., far], ctx[..., far])  # outside: the context
            # at inference there is no crop: the fused map is the slid detail prediction
            torch.testing.assert_close(m(x), F.interpolate(m.detail_logits(x), size=(64, 64), mode="bilinear"))


# --------------------------------------------------------------------------------------------
# Inference
# --------------------------------------------------------------------------------------------
def test_hr_slide_inference_equals_manual_composition():
    m = tiny().eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x = torch.randn(2, 3, 64, 96)
    boxes = slide_boxes(64, 96, (32, 32), (16, 16))  # window 32, stride 16 (half the window)
    assert [b[0] for b in boxes[::5]] == [0, 16, 32] and [b[2] for b in boxes[:5]] == [0, 16, 32, 48, 64]
    with torch.no_grad():
        lr_feats = m.backbone(F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False))
        lr = m.decode_head.head(lr_feats)
        att = torch.sigmoid(m.decode_head.scale_attention(lr_feats))
        hr, count = torch.zeros(2, 19, 16, 24), torch.zeros(1, 1, 16, 24)
        for y1, y2, x1, x2 in boxes:  # one window at a time
            hr[:, :, y1 // 4:y2 // 4, x1 // 4:x2 // 4] += m.decode_head.head(m.backbone(x[..., y1:y2, x1:x2]))
            count[:, :, y1 // 4:y2 // 4, x1 // 4:x2 // 4] += 1
        assert (count > 0).all() and count.max() == 4
        fused = up(att) * (hr / count) + up((1 - att) * lr)
        expected = F.interpolate(fused, size=(64, 96), mode="bilinear", align_corners=False)
        got = m(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    # without hr slide inference the detail pass runs on the whole image: a different prediction
    whole = replace(m.cfg, hrda=replace(m.cfg.hrda, hr_slide_inference=False))
    m2 = build_segmentor(whole).eval()
    m2.load_state_dict(m.state_dict())
    with torch.no_grad():
        assert not torch.allclose(m2(x), got, atol=1e-3)
        # odd sizes: the grids are reconciled, the output has the input size
        assert m(torch.randn(1, 3, 60, 90)).shape == (1, 19, 60, 90)
        # evaluate's outer windows call the model like any segmentor (batched windows)
        slid = slide_logits(m, x, crop=64, stride=32, window_batch=3)
        assert slid.shape == (2, 19, 64, 96) and torch.isfinite(slid).all()
        torch.testing.assert_close(predict_logits(m, x[..., :64], "slide", crop=64, stride=32), m(x[..., :64]))


# --------------------------------------------------------------------------------------------
# Configs, presets, weight files
# --------------------------------------------------------------------------------------------
def test_preset_structure_and_names_follow_hrda():
    cfg = PRESETS["hrda_daformer_mitb5"]
    assert cfg.hrda == HRDAConfig()
    h = cfg.hrda
    assert (h.scales, h.hr_crop_size, h.hr_loss_weight, h.feature_scale, h.crop_coord_divisible) == \
        ((1.0, 0.5), (512, 512), 0.1, 0.5, 8)
    assert h.attention_classwise and h.hr_slide_inference and (h.test_crop, h.test_stride) == (1024, 512)
    with torch.device("meta"):
        m = build_segmentor("hrda_daformer_mitb5")  # the config decides the class
        plain = build_segmentor("daformer_mitb5")
        with pytest.raises(ValueError, match="build_segmentor"):
            Segmentor("hrda_daformer_mitb5")  # never a plain segmentor that ignores cfg.hrda
    assert isinstance(m, HRDASegmentor) and type(plain) is Segmentor and default_window(m) == (1024, 512) and is_hr_model(m)
    assert default_window(plain) == (512, 256) and not is_hr_model(plain)
    head, att = m.decode_head.head, m.decode_head.scale_attention
    assert isinstance(head.fuse_layer, ASPPWrapper)  # the segmentation head is DAFormer's
    assert isinstance(att.fuse_layer, ConvBNReLU) and att.fuse_layer.conv.kernel_size == (1, 1)
    assert att.fuse_layer.conv.in_channels == 4 * 256 and att.fuse_layer.conv.out_channels == 256
    assert att.conv_seg.out_channels == 19 and att.dropout.p == 0.1
    names = set(m.state_dict())
    backbone = {k for k in names if k.startswith("backbone.")}
    assert backbone == {k for k in plain.state_dict() if k.startswith("backbone.")}
    assert {k.split(".")[1] for k in names - backbone} == {"head", "scale_attention"}
    assert "decode_head.scale_attention.fuse_layer.conv.weight" in names
    assert {k.replace("decode_head.head.", "decode_head.") for k in names if k.startswith("decode_head.head.")} == \
        {k for k in plain.state_dict() if k.startswith("decode_head.")}
    assert tiny(attention_classwise=False).decode_head.scale_attention.conv_seg.out_channels == 1
    with pytest.raises(ValueError, match="feature_scale"):
        HRDAConfig(feature_scale=0.25)
    with pytest.raises(ValueError, match="unknown HRDAConfig"):
        SegmentorConfig.from_dict({**asdict(cfg), "hrda": {"scales": [1, 0.5], "bogus": 1}})


def test_config_round_trip_through_weight_files(tmp_path):
    m = tiny(dropout=0.1).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    path = save_segmentor(m, tmp_path / "hrda.safetensors")
    again = load_segmentor(path)
    assert isinstance(again, HRDASegmentor) and again.cfg == m.cfg and again.cfg.hrda.hr_crop_size == (32, 32)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(again(x), m(x))
    # a training checkpoint (DDP prefix, the config as a nested dict next to the weights)
    torch.save({"model": {f"module.{k}": v for k, v in m.state_dict().items()},
                "model_config": asdict(m.cfg), "step": 1}, tmp_path / "step.pt")
    ck = load_segmentor(tmp_path / "step.pt")
    assert isinstance(ck, HRDASegmentor) and ck.cfg == m.cfg
    # the JSON form (lists instead of tuples) rebuilds the same config
    assert SegmentorConfig.from_dict(json.loads(json.dumps(asdict(m.cfg)))) == m.cfg
    # a plain config dict without the field is a plain segmentor
    plain = {k: v for k, v in asdict(PRESETS["tiny"]).items() if k != "hrda"}
    assert type(build_segmentor(plain)) is Segmentor


def test_imagenet_backbone_loading(tmp_path):
    src = MixVisionTransformer("mit_tiny")
    with torch.no_grad():
        for p in src.parameters():
            p.normal_()
    path = export_pretrained(src, tmp_path / "mit_tiny.pth")
    m = tiny().load_backbone(path)
    for k, v in src.state_dict().items():
        assert torch.equal(m.state_dict()[f"backbone.{k}"], v), k


# --------------------------------------------------------------------------------------------
# Training and evaluation
# --------------------------------------------------------------------------------------------


def test_tiny_hrda_training_reduces_the_loss(one_thread):
    torch.manual_seed(0)
    m = tiny().train()
    x, y = batch()
    probe = lambda: m(x, y, generator=torch.Generator().manual_seed(0))["loss"].item()  # noqa: E731
    before = probe()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(40):  # random detail crops, as in training
        loss = m(x, y)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    after = probe()
    assert after < 0.5 * before, (before, after)


def write_folder(root, n=2, h=64, w=128):
    root = Path(root)
    for sub in ("images", "labels"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        lab = street_scene(h, w, seed=[7, i])
        Image.fromarray(colorize(lab)).save(root / "images" / f"{i}.png")
        Image.fromarray(lab).save(root / "labels" / f"{i}_labelTrainIds.png")
    return root


def test_evaluate_dataset_and_cli_on_an_hrda_checkpoint(tmp_path, capsys):
    from segmentation.evaluate import main as evaluate_main
    from segmentation.metrics import mean_iou
    root = write_folder(tmp_path / "data")
    m = tiny()
    ckpt = save_segmentor(m, tmp_path / "hrda.safetensors")
    ds = SegDataset(root, "folder", test_scale=None)
    cm = evaluate_dataset(m, ds)  # the model's window: 64, stride 32
    assert cm.sum() == sum(int((ds[i]["label"] != 255).sum()) for i in range(len(ds))) > 0
    manual = torch.zeros(19, 19, dtype=torch.long)
    for i in range(len(ds)):
        pred = slide_logits(m.eval(), ds[i]["image"][None], 64, 32).argmax(1)[0]
        lab = ds[i]["label"]
        keep = lab != 255
        manual += torch.bincount(lab[keep] * 19 + pred[keep], minlength=361).reshape(19, 19)
    assert torch.equal(cm.cpu(), manual)
    out = tmp_path / "res.json"
    evaluate_main(["--checkpoint", str(ckpt), "--dataset", f"folder:{root}", "--test-scale", "128", "64",
                   "--device", "cpu", "--out", str(out)])
    res = json.loads(out.read_text())
    assert (res["crop"], res["stride"], res["hr"]) == (64, 32, True)  # the model's defaults
    assert res["datasets"]["folder"]["test_scale"] == [128, 64]  # an explicit scale is not doubled
    assert res["results"]["folder"]["mIoU"] == pytest.approx(mean_iou(cm))
    assert "HRDASegmentor" in capsys.readouterr().out
    evaluate_main(["--checkpoint", str(ckpt), "--dataset", f"folder:{root}", "--test-scale", "128", "64", "--no-hr",
                   "--crop", "64", "--stride", "64", "--device", "cpu", "--out", str(out)])
    res = json.loads(out.read_text())
    assert (res["crop"], res["stride"], res["hr"]) == (64, 64, False)
    assert res["datasets"]["folder"]["test_scale"] == [128, 64]


def test_training_script_runs_hrda_with_feature_distance_and_resumes_exactly(tmp_path, one_thread):
    """train_segmentation --model tiny_hrda (64 crops, detail 32): HRDA's loss terms are logged,
    the feature distance pairs the context features with the frozen backbone's features of the
    0.5-scaled crop, evaluation uses the model's window and doubled test scales, the export is an
    HRDA weight file, and a resumed run (random detail crops included) equals an uninterrupted one."""
    from test_seg_train import write_scenes

    from train.train_segmentation import main, parse_args
    src = write_scenes(tmp_path / "src", 3, size=80)
    gen = write_scenes(tmp_path / "gen", 2, size=64, seed=1, generated=True)

    def run(out, *extra):
        main(parse_args(["--model", "hrda_daformer_mitb5", "--tiny", "--source", f"folder:{src}", "--generated", str(gen),
                         "--crop", "64", "--source-scale", "80", "80", "--batch-size", "2", "--lr", "1e-3",
                         "--warmup-iters", "2", "--log-every", "2", "--max-iters", "4", "--ckpt-every", "2",
                         "--fd-lambda", "0.5", "--fd-classes", *map(str, range(19)), "--fd-min-ratio", "0",
                         "--output-dir", str(out), "--device", "cpu", "--num-workers", "0", *extra]))

    run(tmp_path / "a", "--keep-last", "2", "--eval", f"folder:{src}", "--eval-every", "4")
    metrics = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    for m in metrics[:2]:
        assert {"loss", "loss_ce", "loss_fd", "loss_fused", "loss_hr"} <= set(m)
        assert m["loss"] == pytest.approx(m["loss_ce"] + m["loss_fd"], rel=1e-6) and m["loss_fd"] >= 0
    assert metrics[1]["loss_fd"] > 0  # the trained backbone has moved away from the frozen copy
    assert 0 <= metrics[-1]["mIoU/folder"] <= 1
    log = (tmp_path / "a" / "log.txt").read_text()
    assert "tiny_hrda" in log
    ck = torch.load(tmp_path / "a" / "checkpoints" / "step_0000004.pt", weights_only=True)
    assert ck["model_config"]["hrda"]["hr_crop_size"] == (32, 32)
    model = load_segmentor(tmp_path / "a" / "model.safetensors")
    assert isinstance(model, HRDASegmentor) and all(torch.equal(v, ck["model"][k]) for k, v in model.state_dict().items())
    # the evaluation during training: the model's 64 / 32 windows (the folder layout has no test scale)
    single = evaluate_dataset(model, SegDataset(src, "folder", test_scale=None), crop=64, stride=32)
    from segmentation.metrics import mean_iou
    assert metrics[-1]["mIoU/folder"] == pytest.approx(mean_iou(single), abs=1e-6)
    run(tmp_path / "b", "--resume", str(tmp_path / "a" / "checkpoints" / "step_0000002.pt"))
    b = torch.load(tmp_path / "b" / "checkpoints" / "step_0000004.pt", weights_only=True)
    assert all(torch.equal(v, b["model"][k]) for k, v in ck["model"].items())
    start = torch.load(tmp_path / "a" / "checkpoints" / "step_0000002.pt", weights_only=True)["model"]
    assert any(not torch.equal(start[k], v) for k, v in ck["model"].items())
