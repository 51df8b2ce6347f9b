"""Segmentation networks: MiT sizes and key layout, heads, weight files, sliding-window inference."""
import pytest
import torch
import torch.nn.functional as F

from ldm.checkpoint import CheckpointError
from segmentation.evaluate import predict_logits, slide_logits, window_starts
from segmentation.models import (MIT_CONFIGS, MixVisionTransformer, Segmentor, build_segmentor,
                                 export_pretrained, load_pretrained, load_segmentor, save_segmentor)
from segmentation.models.heads import DAFormerHead, SegFormerHead
from segmentation.models.mit import Attention


def official_mit_shapes(embed_dims, depths, sr_ratios, mlp_ratio=4, num_classes=1000):
    """Key -> shape of an NVlabs ``mit_b*.pth`` file, written from the official module tree
    (mix_transformer.py), independently of our classes. Includes the ImageNet ``head``."""
    s, prev = {}, 3
    for i, (c, d, r) in enumerate(zip(embed_dims, depths, sr_ratios), 1):
        k = 7 if i == 1 else 3
        s[f"patch_embed{i}.proj.weight"] = (c, prev, k, k)
        s[f"patch_embed{i}.proj.bias"] = (c,)
        s[f"patch_embed{i}.norm.weight"] = s[f"patch_embed{i}.norm.bias"] = (c,)
        for j in range(d):
            b = f"block{i}.{j}."
            s[b + "norm1.weight"] = s[b + "norm1.bias"] = (c,)
            s[b + "attn.q.weight"], s[b + "attn.q.bias"] = (c, c), (c,)
            s[b + "attn.kv.weight"], s[b + "attn.kv.bias"] = (2 * c, c), (2 * c,)
            s[b + "attn.proj.weight"], s[b + "attn.proj.bias"] = (c, c), (c,)
            if r > 1:
                s[b + "attn.sr.weight"], s[b + "attn.sr.bias"] = (c, c, r, r), (c,)
                s[b + "attn.norm.weight"] = s[b + "attn.norm.bias"] = (c,)
            s[b + "norm2.weight"] = s[b + "norm2.bias"] = (c,)
            h = c * mlp_ratio
            s[b + "mlp.fc1.weight"], s[b + "mlp.fc1.bias"] = (h, c), (h,)
            s[b + "mlp.dwconv.dwconv.weight"], s[b + "mlp.dwconv.dwconv.bias"] = (h, 1, 3, 3), (h,)
            s[b + "mlp.fc2.weight"], s[b + "mlp.fc2.bias"] = (c, h), (c,)
        s[f"norm{i}.weight"] = s[f"norm{i}.bias"] = (c,)
        prev = c
    s["head.weight"], s["head.bias"] = (num_classes, embed_dims[-1]), (num_classes,)
    return s


B0 = dict(embed_dims=(32, 64, 160, 256), depths=(2, 2, 2, 2), sr_ratios=(8, 4, 2, 1))


def random_official_b0(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=g) for k, shape in official_mit_shapes(**B0).items()}


def test_mit_parameter_counts():
    counts = {}
    for name in ("mit_b0", "mit_b5"):
        with torch.device("meta"):
            counts[name] = sum(p.numel() for p in MixVisionTransformer(name).parameters())
    assert 3.25e6 < counts["mit_b0"] < 3.4e6  # SegFormer paper: 3.3 M (B0 encoder)
    assert 81.2e6 < counts["mit_b5"] < 81.6e6  # 81.4 M (B5 encoder)
    with torch.device("meta"):  # whole models: SegFormer-B5 84.7 M, DAFormer 85.2 M (their papers)
        assert abs(sum(p.numel() for p in Segmentor("segformer_mitb5").parameters()) / 1e6 - 84.7) < 0.1
        assert abs(sum(p.numel() for p in Segmentor("daformer_mitb5").parameters()) / 1e6 - 85.2) < 0.1


def test_official_key_layout_matches_every_size():
    for name in ("mit_b0", "mit_b1", "mit_b2", "mit_b3", "mit_b4", "mit_b5"):
        cfg = MIT_CONFIGS[name]
        with torch.device("meta"):
            ours = {k: tuple(v.shape) for k, v in MixVisionTransformer(name).state_dict().items()}
        official = official_mit_shapes(cfg.embed_dims, cfg.depths, cfg.sr_ratios)
        official = {k: v for k, v in official.items() if not k.startswith("head.")}
        assert ours == official, name


def test_official_file_loads_strictly_and_export_is_identity(tmp_path):
    sd = random_official_b0()
    path = tmp_path / "mit_b0.pth"
    torch.save(sd, path)
    model = load_pretrained(MixVisionTransformer("mit_b0"), path)
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    for suffix in (".pth", ".safetensors"):
        out = export_pretrained(model, tmp_path / f"export{suffix}")
        again = load_pretrained(MixVisionTransformer("mit_b0"), out)
        exported = {k: v for k, v in sd.items() if not k.startswith("head.")}
        assert set(again.state_dict()) == set(exported)
        for k, v in again.state_dict().items():
            assert torch.equal(v, exported[k]), k
    # an mmseg checkpoint ({"state_dict": {"backbone.*": ...}}) and a Segmentor load it too
    wrapped = {"state_dict": {f"backbone.{k}": v for k, v in sd.items()} | {"decode_head.x": torch.zeros(1)}}
    torch.save(wrapped, tmp_path / "mmseg.pth")
    seg = Segmentor("segformer_mitb0").load_backbone(tmp_path / "mmseg.pth")
    assert torch.equal(seg.backbone.block1[0].attn.kv.weight, sd["block1.0.attn.kv.weight"])


def test_strict_loading_names_file_and_keys(tmp_path):
    sd = random_official_b0()
    del sd["block2.1.attn.sr.weight"]
    sd["block9.0.attn.q.weight"] = torch.zeros(3)
    path = tmp_path / "broken.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError) as e:
        load_pretrained(MixVisionTransformer("mit_b0"), path)
    msg = str(e.value)
    assert str(path) in msg and "block2.1.attn.sr.weight" in msg and "block9.0.attn.q.weight" in msg
    assert "missing" in msg and "unexpected" in msg
    with pytest.raises(CheckpointError, match=r"(?s)mis-shaped.*looks like mit_b0"):  # B0 file into a B1 model
        load_pretrained(MixVisionTransformer("mit_b1"), random_official_b0())


def test_efficient_attention_matches_the_official_forward():
    torch.manual_seed(0)
    attn = Attention(dim=16, num_heads=2, sr_ratio=2, qkv_bias=True, eps=1e-6).eval()
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x, h, w = torch.randn(2, 6 * 4, 16), 6, 4
    # the official forward, step by step (mix_transformer.py Attention.forward)
    b, n, c = x.shape
    q = attn.q(x).reshape(b, n, 2, c // 2).permute(0, 2, 1, 3)
    x_ = attn.norm(attn.sr(x.permute(0, 2, 1).reshape(b, c, h, w)).reshape(b, c, -1).permute(0, 2, 1))
    kv = attn.kv(x_).reshape(b, -1, 2, 2, c // 2).permute(2, 0, 3, 1, 4)
    a = ((q @ kv[0].transpose(-2, -1)) * (c // 2) ** -0.5).softmax(-1)
    ref = attn.proj((a @ kv[1]).transpose(1, 2).reshape(b, n, c))
    torch.testing.assert_close(attn(x, h, w), ref, rtol=1e-5, atol=1e-5)


def test_backbone_strides_and_stochastic_depth():
    m = MixVisionTransformer("mit_tiny")
    feats = m(torch.randn(1, 3, 64, 96))
    assert [tuple(f.shape[1:]) for f in feats] == [(16, 16, 24), (24, 8, 12), (32, 4, 6), (48, 2, 3)]
    import dataclasses
    cfg = dataclasses.replace(MIT_CONFIGS["mit_tiny"], depths=(2, 2, 2, 2), drop_path_rate=0.5)
    m = MixVisionTransformer(cfg)
    rates = [blk.drop_path for i in range(1, 5) for blk in getattr(m, f"block{i}")]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.5) and rates == sorted(rates)
    x = torch.randn(4, 3, 32, 32)
    m.eval()
    assert torch.equal(m(x)[-1], m(x)[-1])
    m.train()
    assert not torch.equal(m(x)[-1], m(x)[-1])


def test_daformer_head_structure():
    with torch.device("meta"):
        head = Segmentor("daformer_mitb5").decode_head
    assert isinstance(head, DAFormerHead)
    assert [m.proj.out_features for m in head.embed_layers.values()] == [256] * 4
    assert [m.proj.in_features for m in head.embed_layers.values()] == [64, 128, 320, 512]
    aspp = head.fuse_layer.aspp_modules
    assert len(aspp) == 4  # dilations 1, 6, 12, 18 and no image-pool branch
    assert aspp[0].conv.kernel_size == (1, 1)
    assert [m.depthwise_conv.conv.dilation[0] for m in list(aspp)[1:]] == [6, 12, 18]
    assert all(m.depthwise_conv.conv.groups == 1024 for m in list(aspp)[1:])
    assert head.fuse_layer.bottleneck.conv.in_channels == 4 * 256 and isinstance(head.fuse_layer.bottleneck.bn, torch.nn.BatchNorm2d)
    assert head.dropout.p == 0.1 and head.conv_seg.out_channels == 19
    with torch.device("meta"):
        seg = Segmentor("segformer_mitb5").decode_head
    assert isinstance(seg, SegFormerHead) and seg.linear_fuse.conv.in_channels == 4 * 768


@pytest.mark.parametrize("preset", ["tiny", "tiny_segformer", "tiny_deeplab"])
def test_segmentor_forward_and_head_names(preset):
    m = build_segmentor(preset).eval()
    out = m(torch.randn(2, 3, 48, 80))
    assert out.shape == (2, 19, 48, 80) and torch.isfinite(out).all()
    names = [n for n, _ in m.named_parameters()]
    assert all(n.startswith(("backbone.", "decode_head.")) for n in names)
    assert any("head" in n for n in names) and not any("head" in n for n in names if n.startswith("backbone."))


def test_save_and_load_segmentor(tmp_path):
    m = build_segmentor("tiny", num_classes=7).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    path = save_segmentor(m, tmp_path / "m.safetensors")
    again = load_segmentor(path)
    assert again.cfg == m.cfg
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(again(x), m(x))
    # a training checkpoint layout (DDP prefix, config next to the weights)
    torch.save({"model": {f"module.{k}": v for k, v in m.state_dict().items()},
                "model_config": {**again.cfg.__dict__}, "step": 3}, tmp_path / "step.pt")
    assert torch.equal(load_segmentor(tmp_path / "step.pt")(x), m(x))
    sd = m.state_dict()
    sd.pop("decode_head.conv_seg.weight")
    torch.save({"model": sd, "model_config": {**m.cfg.__dict__}}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=r"(?s)bad.pt.*missing.*decode_head.conv_seg.weight"):
        load_segmentor(tmp_path / "bad.pt")
    torch.save(m.state_dict(), tmp_path / "noconfig.pt")
    with pytest.raises(CheckpointError, match="no segmentor config"):
        load_segmentor(tmp_path / "noconfig.pt")
    assert torch.equal(load_segmentor(tmp_path / "noconfig.pt", config=m.cfg)(x), m(x))


def test_window_starts_cover_like_mmseg():
    assert window_starts(1024, 512, 256) == [0, 256, 512]
    assert window_starts(1000, 512, 256) == [0, 256, 488]  # last window aligned to the edge
    assert window_starts(300, 512, 256) == [0]
    for size in range(1, 90):
        starts = window_starts(size, 32, 20)
        covered = set()
        for s in starts:
            covered |= set(range(s, min(s + 32, size)))
        assert covered == set(range(size))


def test_sliding_window_equals_whole_image_when_one_window_covers_it():
    m = build_segmentor("tiny").eval()
    x = torch.randn(2, 3, 40, 56)
    whole = predict_logits(m, x, "whole")
    for crop in (56, 64, (40, 56)):
        assert torch.equal(slide_logits(m, x, crop=crop, stride=16), whole)
    # overlapping windows: a per-pixel model gives the same logits whatever the windows (the
    # averaging divides by the right counts); a real model differs, but not wildly
    conv = torch.nn.Conv2d(3, 19, 1)
    torch.testing.assert_close(slide_logits(conv, x, crop=24, stride=10, window_batch=3), conv(x), rtol=1e-5, atol=1e-6)
    slid = slide_logits(m, x, crop=32, stride=16)
    assert slid.shape == whole.shape and not torch.equal(slid, whole)
    up = predict_logits(m, x, "slide", crop=32, stride=16, out_size=(80, 112))
    torch.testing.assert_close(up, F.interpolate(slid, size=(80, 112), mode="bilinear", align_corners=False))
