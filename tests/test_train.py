"""Training scripts (train/) on tiny random models and tiny procedural data, on CPU.

Covers: dataset layouts and their errors, the sharded sampler, per-item randomness (RCS, caption
dropout), checkpoints with RNG state, exact resume, gradient accumulation and checkpointing,
latent caching, exports that load back, the Style Swap validation, and a 2-process gloo run.
"""
from __future__ import annotations

import copy
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import default_collate

from controlnet.checkpoint import load_controlnet
from helpers import rel_err
from controlnet.model import ControlNet
from ldm import checkpoint as ckpt_io
from ldm.sd import StableDiffusion
from ldm.vae import DiagonalGaussian
from mrlf.prompts import class_stack
from samplers import SD15
from segmentation.datasets import DatasetError
from segmentation.labels import load_label, one_hot
from segmentation.synthetic import street_scene
from train import common, finetune_unet, train_controlnet
from train.data import (ControlNetDataset, ImageDataset, LatentCache, ShardSampler, diffusion_inputs, discover_pairs,
                        fill_latent_cache, find_images, pair_class_stats, to_tensor)

ROOT = Path(__file__).resolve().parents[1]
RES = 64  # training resolution of every test (tiny U-Net: 8x8 latents)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors gain nothing from threads, and OpenMP spin-waits stall badly on a shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------------------
# Procedural data
# ---------------------------------------------------------------------------------------

def _scene(i: int, h: int = 64, w: int = 96) -> tuple[np.ndarray, np.ndarray]:
    label = street_scene(h, w, seed=i)
    image = np.random.default_rng(1000 + i).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return image, label


def _write_gta(root: Path, n: int = 6, raw: bool = False, train_ids: bool = True) -> Path:
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        image, label = _scene(i)
        Image.fromarray(image).save(root / "images" / f"{i:05d}.png")
        if train_ids:
            Image.fromarray(label).save(root / "labels" / f"{i:05d}_labelTrainIds.png")
        if raw:  # raw GTA ids (any values; only the file's presence matters here)
            Image.fromarray((label.astype(np.int64) % 34).astype(np.uint8)).save(root / "labels" / f"{i:05d}.png")
    return root


@pytest.fixture(scope="module")
def gta(tmp_path_factory) -> Path:
    return _write_gta(tmp_path_factory.mktemp("gta"))


@pytest.fixture(scope="module")
def tiny_prior(tmp_path_factory) -> Path:
    """A tiny random U-Net (another seed than --tiny's U^S) as a native file: stands in for U^P."""
    unet = StableDiffusion.random("tiny", seed=123).unet
    return ckpt_io.save_native(tmp_path_factory.mktemp("prior") / "unet_p.safetensors", unet)


def _args(module, **kw) -> object:
    argv = []
    for k, v in kw.items():
        flag = "--" + k.replace("_", "-")
        if v is True:
            argv.append(flag)
        elif v is False or v is None:
            continue
        elif isinstance(v, (list, tuple)):
            argv += [flag, *map(str, v)]
        else:
            argv += [flag, str(v)]
    return module.get_parser().parse_args(argv)


FT = dict(tiny=True, resolution=RES, num_workers=0, log_every=1, sample_every=0, ckpt_every=1000)
CN = dict(tiny=True, resolution=RES, num_workers=0, log_every=1, validation_every=0, ckpt_every=1000,
          rcs_min_pixels=50)


def run_finetune(data, out, **kw):
    finetune_unet.main(_args(finetune_unet, data=data, output_dir=out, **{**FT, **kw}))
    return common.read_metrics(out)


def run_controlnet(data, out, **kw):
    train_controlnet.main(_args(train_controlnet, data=data, output_dir=out, **{**CN, **kw}))
    return common.read_metrics(out)


def _ckpt(out, step):
    return common.load_checkpoint(common.checkpoint_path(Path(out) / "checkpoints", step))


def _assert_same_tensors(a, b, path="state"):
    """Bit-identical nested state (dicts/lists of tensors and plain values)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _assert_same_tensors(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_tensors(x, y, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), path
    else:
        assert a == b, path


# ---------------------------------------------------------------------------------------
# Layouts
# ---------------------------------------------------------------------------------------

def test_layouts_are_discovered(tmp_path):
    gta = _write_gta(tmp_path / "gta", n=3, raw=True)
    layout, pairs = discover_pairs(gta)
    assert layout == "gta" and [p.image.name for p in pairs] == ["00000.png", "00001.png", "00002.png"]
    assert all(p.label.name == p.image.stem + "_labelTrainIds.png" for p in pairs)

    paired = tmp_path / "paired"  # trainIds under the image's own stem (a generated dataset)
    (paired / "images").mkdir(parents=True)
    (paired / "labels").mkdir()
    for i in range(2):
        image, label = _scene(i)
        Image.fromarray(image).save(paired / "images" / f"gen_{i}.jpg")
        Image.fromarray(label).save(paired / "labels" / f"gen_{i}.png")
    layout, pairs = discover_pairs(paired, "paired")
    assert layout == "paired" and [(p.image.name, p.label.name) for p in pairs] == [
        ("gen_0.jpg", "gen_0.png"), ("gen_1.jpg", "gen_1.png")]

    cs = tmp_path / "cityscapes"
    for split, city, n in (("train", "aachen", 2), ("train", "bremen", 1), ("val", "lindau", 1)):
        (cs / "leftImg8bit" / split / city).mkdir(parents=True)
        (cs / "gtFine" / split / city).mkdir(parents=True)
        for i in range(n):
            image, label = _scene(i)
            stem = f"{city}_{i:06d}_000019"
            Image.fromarray(image).save(cs / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png")
            Image.fromarray(label).save(cs / "gtFine" / split / city / f"{stem}_gtFine_labelTrainIds.png")
            Image.fromarray(label).save(cs / "gtFine" / split / city / f"{stem}_gtFine_color.png")
    layout, pairs = discover_pairs(cs)
    assert layout == "cityscapes" and len(pairs) == 3
    assert all(p.label.parent.name == p.image.parent.name for p in pairs)
    assert all(p.label.name.endswith("_gtFine_labelTrainIds.png") for p in pairs)
    assert len(discover_pairs(cs, split="val")[1]) == 1

    # the original's dataset file: paths relative to the working dir (data/gta/...), raw label named
    lines = [json.dumps({"text": "road", "image": f"gta/images/{i:05d}.png",
                         "conditioning_image": f"gta/labels/{i:05d}.png"}) for i in range(3)]
    (tmp_path / "dataset_file.json").write_text("\n".join(lines) + "\n")
    layout, pairs = discover_pairs(tmp_path / "dataset_file.json")
    assert layout == "jsonl" and len(pairs) == 3 and pairs[1].text == "road"
    assert pairs[1].label == gta / "labels" / "00001_labelTrainIds.png"

    nested = tmp_path / "nested"
    (nested / "a" / "b").mkdir(parents=True)
    for name in ("a/x.png", "a/b/y.jpg", "z.JPG"):
        Image.new("RGB", (8, 8)).save(nested / name, format="JPEG" if "jpg" in name.lower() else "PNG")
    (nested / "a" / "notes.txt").write_text("x")
    assert [p.relative_to(nested).as_posix() for p in find_images(nested)] == ["a/b/y.jpg", "a/x.png", "z.JPG"]


def test_bad_layouts_give_clear_errors(tmp_path):
    raw_only = _write_gta(tmp_path / "raw_only", n=2, raw=True, train_ids=False)
    with pytest.raises(DatasetError, match=r"segmentation\.labels convert --source gta .*--layout paired"):
        discover_pairs(raw_only)
    with pytest.raises(DatasetError, match=r"2 trainId label file\(s\) are missing.*segmentation\.labels convert "
                                          r"--source gta"):
        discover_pairs(raw_only, "gta")

    partly = _write_gta(tmp_path / "partly", n=3, raw=True)
    (partly / "labels" / "00001_labelTrainIds.png").unlink()
    with pytest.raises(DatasetError, match=r"1 trainId label file\(s\).*00001_labelTrainIds\.png"):
        discover_pairs(partly)

    unlabelled = _write_gta(tmp_path / "unlabelled", n=2)
    Image.new("RGB", (8, 8)).save(unlabelled / "images" / "99999.png")
    with pytest.raises(DatasetError, match=r"1 image\(s\) have no label.*99999\.png"):
        discover_pairs(unlabelled)

    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="unknown dataset layout"):
        discover_pairs(tmp_path / "empty")
    with pytest.raises(DatasetError, match="no such folder"):
        discover_pairs(tmp_path / "missing")
    with pytest.raises(DatasetError, match="unknown layout 'coco'"):
        discover_pairs(tmp_path, "coco")
    with pytest.raises(DatasetError, match="no \\*.png / \\*.jpg images"):
        find_images(tmp_path / "empty")

    cs = tmp_path / "cs"
    (cs / "leftImg8bit" / "train" / "ulm").mkdir(parents=True)
    (cs / "gtFine" / "train" / "ulm").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(cs / "leftImg8bit" / "train" / "ulm" / "ulm_000000_000019_leftImg8bit.png")
    with pytest.raises(DatasetError, match=r"ulm_000000_000019_gtFine_labelTrainIds\.png.*--source cityscapes "
                                          r".*--recursive"):
        discover_pairs(cs)

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "x", "image": "nope.png"}) + "\n")
    with pytest.raises(DatasetError, match=r"bad\.jsonl:1: needs keys 'image' and 'conditioning_image'"):
        discover_pairs(bad)
    bad.write_text(json.dumps({"image": "nope.png", "conditioning_image": "n.png"}) + "\n")
    with pytest.raises(DatasetError, match=r"bad\.jsonl:1: image 'nope\.png' not found"):
        discover_pairs(bad)


# ---------------------------------------------------------------------------------------
# Sampler and per-item randomness
# ---------------------------------------------------------------------------------------

def _take(it, n):
    return [next(it) for _ in range(n)]


def test_shard_sampler_splits_ranks_and_restarts_anywhere():
    n, world = 10, 3
    streams = [_take(iter(ShardSampler(n, r, world, seed=5)), 8) for r in range(world)]  # 2 epochs of 4 per rank
    for e in (0, 1):
        epoch = [idx for s in streams for (ep, idx) in s[4 * e:4 * e + 4]]
        assert all(ep == e for s in streams for (ep, _) in s[4 * e:4 * e + 4])
        assert sorted(set(epoch)) == list(range(n)) and len(epoch) == 12  # 2 padded by wrapping
        assert not set(x for _, x in streams[0][4 * e:4 * e + 3]) & set(x for _, x in streams[1][4 * e:4 * e + 3])
    assert [i for _, i in streams[0][:4]] != [i for _, i in streams[0][4:]]  # a new permutation per epoch
    # resume at any position continues the same stream
    assert _take(iter(ShardSampler(n, 1, world, seed=5, start=3)), 5) == streams[1][3:8]
    assert [i for _, i in _take(iter(ShardSampler(4, shuffle=False)), 5)] == [0, 1, 2, 3, 0]


def test_controlnet_items_are_keyed_rcs_crops(gta):
    _, pairs = discover_pairs(gta)
    stats = pair_class_stats(pairs, cache_dir=gta.parent / "rcs_cache")
    assert stats.counts.sum() == sum(int((load_label(p.label) != 255).sum()) for p in pairs)
    ds = ControlNetDataset(pairs, RES, "rcs", seed=0, rank=0, stats=stats, rcs_min_pixels=50)
    a, b = ds[(0, 3)], ds[(0, 3)]
    ds.set_epoch(1)  # plain indices (torch's DistributedSampler) take the dataset's epoch
    assert ds[3]["seed"] == ds[(1, 3)]["seed"] != a["seed"]
    assert a["desc"] == b["desc"] and a["seed"] == b["seed"] and torch.equal(a["pixel_values"], b["pixel_values"])
    # the crop: image and label cut at the same place, caption = the crop's class stack, RCS class inside
    name, rest = a["desc"].split("@")
    xy, c = rest.split("#")
    x1, y1 = map(int, xy.split(","))
    i = [p.label.name for p in pairs].index(name)
    image, label = _scene(i)
    assert torch.equal(a["label"], torch.from_numpy(label[y1:y1 + RES, x1:x1 + RES]))
    expect = torch.from_numpy(image[y1:y1 + RES, x1:x1 + RES]).permute(2, 0, 1).float() / 127.5 - 1
    assert (a["pixel_values"] - expect).abs().max() < 1e-6
    assert a["caption"] == class_stack(label[y1:y1 + RES, x1:x1 + RES]) and (a["label"] == int(c)).any()
    # ranks, epochs and indices all give other draws (the original drew the same on every rank)
    other_rank = ControlNetDataset(pairs, RES, "rcs", seed=0, rank=1, stats=stats, rcs_min_pixels=50)
    draws = lambda d, keys: [(d[k]["desc"], d[k]["seed"]) for k in keys]  # noqa: E731
    keys = [(0, i) for i in range(6)]
    assert not set(draws(ds, keys)) & set(draws(other_rank, keys))
    assert len({s for _, s in draws(ds, keys + [(1, i) for i in range(6)])}) == 12
    # rare classes are over-sampled: the RCS class of each item is drawn by P(c), not by pixel share
    classes = [int(ds[(0, i)]["desc"].split("#")[1]) for i in range(60)]
    probs = dict(zip(ds.sampler.classes.tolist(), ds.sampler.probs.tolist()))
    common_cls = max(probs, key=lambda k: stats.totals()[k])
    assert classes.count(common_cls) < 0.5 * len(classes)


def test_caption_dropout_really_drops(gta):
    _, pairs = discover_pairs(gta)
    keys = [(e, i) for e in range(20) for i in range(len(pairs))]

    def items(p):
        ds = ControlNetDataset(pairs, RES, "random", seed=0, proportion_empty_prompts=p)
        return [ds[k] for k in keys]

    never, half, always = items(0.0), items(0.5), items(1.0)
    assert all(it["caption"] for it in never)
    assert all(it["caption"] == "" for it in always)
    empty = sum(it["caption"] == "" for it in half) / len(half)
    assert 0.35 < empty < 0.65
    # dropping a caption changes nothing else about the item (the draw is always made)
    for a, b in zip(never, half):
        assert a["desc"] == b["desc"] and a["seed"] == b["seed"] and b["caption"] in ("", a["caption"])
    with pytest.raises(ValueError, match="proportion_empty_prompts"):
        ControlNetDataset(pairs, RES, "random", proportion_empty_prompts=1.5)


def test_caption_template_words_controlnet_captions(gta, tmp_path):
    words = ["rainy", "foggy", "night", "snowy", "dusk", "rainy"]
    data = tmp_path / "styled.jsonl"
    rows = [{"image": str(gta / "images" / f"{i:05d}.png"), "weather": w,
             "conditioning_image": str(gta / "labels" / f"{i:05d}_labelTrainIds.png")} for i, w in enumerate(words)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _, pairs = discover_pairs(data)
    template = "A city street scene with {classes}, in {weather} weather."
    plain = ControlNetDataset(pairs, RES, "random", seed=0, proportion_empty_prompts=0.3)
    styled = ControlNetDataset(pairs, RES, "random", seed=0, proportion_empty_prompts=0.3, caption_template=template)
    keys = [(e, i) for e in range(3) for i in range(len(pairs))]
    for k in keys:
        a, b = plain[k], styled[k]
        assert a["desc"] == b["desc"] and a["seed"] == b["seed"]  # the template draws nothing
        word = words[int(a["desc"].split("@")[0][:5])]
        assert b["caption"] == (f"A city street scene with {a['caption']}, in {word} weather." if a["caption"] else "")
    assert sum(bool(styled[k]["caption"]) for k in keys) >= len(keys) // 2
    # a key the rows lack, a layout without rows, a malformed template: clear errors
    with pytest.raises(DatasetError, match=r"needs the key\(s\) \['season'\].*00000\.png; its row has \["):
        ControlNetDataset(pairs, RES, "random", caption_template="{classes} in {season}")
    with pytest.raises(DatasetError, match=r"\['weather'\].*only a \.jsonl dataset file's rows have keys"):
        ControlNetDataset(discover_pairs(gta)[1], RES, "random", caption_template=template)
    for bad in ("{classes", "{0} street", "a {} street"):
        with pytest.raises(SystemExit):
            _args(train_controlnet, data=data, output_dir=tmp_path / "x", caption_template=bad)
    # training captions and validation prompts follow the template; PNG validation labels carry no words
    out = tmp_path / "run"
    run_controlnet(data, out, max_steps=1, caption_template=template, validation_every=1, num_validation=2,
                   validation_images=1, validation_steps=2)
    assert "in rainy weather.', 'A city street scene with" in (out / "log.txt").read_text()
    with pytest.raises(SystemExit, match=r"needs \['weather'\] for the validation label .*00001_labelTrainIds"):
        run_controlnet(data, tmp_path / "png", max_steps=1, caption_template=template, validation_every=1,
                       validation_labels=[gta / "labels" / "00001_labelTrainIds.png"])


def test_image_dataset_rescales_pads_and_crops(tmp_path):
    Image.fromarray(_scene(0, 40, 50)[0]).save(tmp_path / "a_small.png")
    Image.fromarray(_scene(1)[0]).save(tmp_path / "b_big.png")
    files = find_images(tmp_path)
    ds = ImageDataset(files, RES, seed=3)
    ratios = set()
    for e in range(12):
        it = ds[(e, 0)]
        assert it["pixel_values"].shape == (3, RES, RES) and it["caption"] == ""
        assert -1 <= it["pixel_values"].min() and it["pixel_values"].max() <= 1
        ratios.add(float(it["desc"].split("@")[1].split(",")[0]))
    assert len(ratios) >= 4 and ratios <= {0.5, 0.75, 1.0, 1.25, 1.5, 2.0}
    # no rescale + centre crop: exactly the middle of the image; small images padded by reflection
    fixed = ImageDataset(files, RES, scales=[1.0], crop="center")
    img = np.asarray(Image.open(tmp_path / "b_big.png"))
    expect = torch.from_numpy(img[:, 16:80].copy()).permute(2, 0, 1).float() / 127.5 - 1
    assert (fixed[1]["pixel_values"] - expect).abs().max() < 1e-6
    small = fixed[0]["pixel_values"]  # 40x50 -> reflect-padded to 64x64, centre (0, 0)
    assert torch.equal(small[:, 40:41, :50], small[:, 38:39, :50])
    with pytest.raises(ValueError, match="single scale"):
        ImageDataset(files, RES, cache=LatentCache(tmp_path / "c", "x", 8))
    with pytest.raises(ValueError, match="multiple of the VAE's factor 8"):
        ImageDataset(files, 36, scales=[1.0], cache=LatentCache(tmp_path / "c", "x", 8))


class _PoolVAE(torch.nn.Module):
    """An encoder that commutes with cropping on its grid and with flips (mean = f x f average pool, log-variance
    = the pooled square): a cached whole-image entry sliced at a crop must give exactly the crop's own moments."""

    def __init__(self, f: int):
        super().__init__()
        self.f, self.dummy = f, torch.nn.Parameter(torch.zeros(()))

    def encode(self, x):
        pool = torch.nn.functional.avg_pool2d
        return DiagonalGaussian(torch.cat([pool(x, self.f), pool(x.square(), self.f)], dim=1))


def _pool(x: torch.Tensor, f: int) -> torch.Tensor:
    post = _PoolVAE(f).encode(x[None])
    return torch.cat([post.mean, post.logvar], dim=1)[0]


def _origin(desc: str) -> tuple[int, int]:
    x1, y1 = desc.split("@")[1].split("#")[0].split(",")[-2:]
    return int(x1), int(y1)


def test_latent_cache_random_crops_and_flips(tmp_path):
    """Random crops read a slice of the whole image's entry, the crop drawn as without the cache and snapped to the
    latent grid; flips read the mirrored entry. Checked against the crop's own moments with an encoder that
    commutes with both (an odd-sized image is padded, then trimmed to the grid)."""
    f, res = 8, 32
    for i, (h, w) in enumerate([(64, 100), (30, 45)]):
        Image.fromarray(_scene(i, h, w)[0]).save(tmp_path / f"{i}.png")
    files = find_images(tmp_path)
    plain = ImageDataset(files, res, [1.0], seed=5, flip=True)
    cache = LatentCache(tmp_path / "cache", "pool", f)
    cached = ImageDataset(files, res, [1.0], seed=5, flip=True, cache=cache)
    assert cached.cache_entries() == [(0, False), (0, True), (1, False), (1, True)]
    assert fill_latent_cache(cached, _PoolVAE(f), "cpu", batch_size=3) == 4
    assert fill_latent_cache(cached, _PoolVAE(f), "cpu") == 0  # all there
    assert cached.entry_view(0).shape == (3, 64, 96)  # 100 columns trimmed to the grid
    snapped = flips = 0
    for e in range(20):
        for i in range(2):
            a, b = plain[(e, i)], cached[(e, i)]
            assert a["seed"] == b["seed"] and a["caption"] == b["caption"]
            (x0, y0), (x1, y1) = _origin(a["desc"]), _origin(b["desc"])
            assert (x1, y1) == (x0 - x0 % f, y0 - y0 % f)
            snapped += (x1, y1) != (x0, y0)
            crop = plain._padded(i)[y0:y0 + res, x0:x0 + res]
            flipped = not torch.equal(a["pixel_values"], to_tensor(crop))
            flips += flipped
            want = to_tensor(plain._padded(i)[y1:y1 + res, x1:x1 + res])
            want = _pool(want.flip(-1) if flipped else want, f)
            assert b["moments"].shape == (6, res // f, res // f) and torch.allclose(b["moments"], want, atol=1e-6)
    assert snapped > 5 and 5 < flips < 35  # both paths were exercised


def test_diffusion_inputs_depend_on_the_item_only():
    vae = StableDiffusion.random("tiny").vae
    x = torch.rand(4, 3, RES, RES) * 2 - 1
    seeds = [11, 22, 33, 44]
    z, eps, t = diffusion_inputs({"pixel_values": x, "seed": torch.tensor(seeds)}, vae, "cpu")
    z2, eps2, t2 = diffusion_inputs({"pixel_values": x[2:], "seed": torch.tensor(seeds[2:])}, vae, "cpu")
    assert z.shape == eps.shape == (4, 4, 8, 8) and t.dtype == torch.int64 and 0 <= t.min() and t.max() < 1000
    assert torch.equal(eps[2:], eps2) and torch.equal(t[2:], t2) and torch.allclose(z[2:], z2, atol=1e-6)
    assert not torch.equal(eps[0], eps[1])
    mean = vae.encode(x).mean * vae.cfg.scaling_factor
    assert (z - mean).abs().max() > 1e-4  # a posterior sample, not the mean


def test_noise_offset_adds_a_per_channel_constant_and_changes_nothing_else():
    vae = StableDiffusion.random("tiny").vae
    batch = {"pixel_values": torch.rand(3, 3, RES, RES) * 2 - 1, "seed": torch.tensor([5, 6, 7])}
    z, eps, t = diffusion_inputs(batch, vae, "cpu")
    z1, eps1, t1 = diffusion_inputs(batch, vae, "cpu", noise_offset=0.1)
    assert torch.equal(t, t1) and torch.equal(z, z1)  # the offset is drawn last: the other draws stay
    offset = eps1 - eps
    assert torch.allclose(offset, offset[:, :, :1, :1].expand_as(offset), atol=1e-6)  # constant over the image
    per = offset[:, :, 0, 0]
    assert per.abs().max() > 1e-3 and not torch.allclose(per[0], per[1])  # per item and channel
    unit = diffusion_inputs(batch, vae, "cpu", noise_offset=1.0)[1] - eps  # the same draw, scaled
    assert torch.allclose(offset, 0.1 * unit, atol=1e-6)
    assert 0.3 < float(unit[:, :, 0, 0].std()) < 3  # N(0, 1)


# ---------------------------------------------------------------------------------------
# common.py
# ---------------------------------------------------------------------------------------

def test_checkpoints_hold_every_rng_state(tmp_path):
    d = common.Dist()
    common.seed_everything(7, d)
    g_torch, g_np = torch.Generator().manual_seed(1), np.random.default_rng(2)
    gens = {"data": g_torch, "crops": g_np}
    for _ in range(5):
        common.save_checkpoint(tmp_path, _ + 1, {"model": {"w": torch.arange(3.0)}, "config": {"lr": 1e-5}}, d,
                               keep_last=2, generators=gens)
    assert [p.name for p in common.list_checkpoints(tmp_path)] == ["step_0000004.pt", "step_0000005.pt"]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert common.resolve_resume("auto", tmp_path) == tmp_path / "step_0000005.pt"
    assert common.resolve_resume("auto", tmp_path / "none") is None
    assert common.resolve_resume(None, tmp_path / "none") is None
    assert common.resolve_resume("", tmp_path / "none") is None
    with pytest.raises(FileNotFoundError):
        common.resolve_resume(str(tmp_path / "step_9.pt"), tmp_path)
    # a fresh start in a folder with an earlier run's checkpoints: the rotation would delete its own first
    with pytest.raises(FileExistsError, match=r"step_0000005.pt.*--resume auto"):
        common.resolve_resume(None, tmp_path)
    expect = (random.random(), np.random.rand(), torch.rand(2), torch.rand(1, generator=g_torch), g_np.random())
    for _ in range(3):  # move every stream on
        random.random(), np.random.rand(), torch.rand(2), torch.rand(1, generator=g_torch), g_np.random()
    ck = common.load_checkpoint(tmp_path / "step_0000005.pt")
    assert ck["step"] == 5 and ck["world_size"] == 1 and ck["config"] == {"lr": 1e-5} and len(ck["rng"]) == 1
    assert common.restore_rng(ck, d, gens)
    got = (random.random(), np.random.rand(), torch.rand(2), torch.rand(1, generator=g_torch), g_np.random())
    assert got[0] == expect[0] and got[1] == expect[1] and got[4] == expect[4]
    assert torch.equal(got[2], expect[2]) and torch.equal(got[3], expect[3])
    assert not common.restore_rng({**ck, "rng": ck["rng"] * 2}, d)  # another world size: not restored
    with pytest.raises(KeyError, match="other"):
        common.set_rng_state(ck["rng"][0], {"other": torch.Generator()})


def test_ema_and_no_sync():
    model, ema = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    before = ema.weight.detach().clone()
    common.update_ema(ema, model, decay=0.9)
    assert torch.allclose(ema.weight, 0.9 * before + 0.1 * model.weight.detach())
    with common.no_sync(model, sync=False):  # a plain module: nothing to skip
        model(torch.ones(1, 2)).sum().backward()
    assert model.weight.grad is not None
    assert common.compute_dtype("auto", torch.device("cpu")) == torch.float32
    assert common.compute_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    assert common.grad_scaler(torch.device("cpu"), torch.float16).is_enabled()
    assert not common.grad_scaler(torch.device("cpu"), torch.bfloat16).is_enabled()


# ---------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------

def _grads(module):
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def test_min_snr_weighting_matches_its_formula():
    """--snr-gamma: each sample's ε-MSE times min(SNR_t, γ) / SNR_t, SNR_t = ᾱ_t / (1 - ᾱ_t); a γ above every
    SNR gives back the plain mean."""
    sd = StableDiffusion.random("tiny", seed=0)
    g = torch.Generator().manual_seed(0)
    z0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t, ctx = torch.tensor([5, 300, 990]), torch.randn(3, 77, 32, generator=g)
    with torch.no_grad():
        plain = finetune_unet.diffusion_loss(sd.unet, z0, noise, t, ctx)
        weighted = finetune_unet.diffusion_loss(sd.unet, z0, noise, t, ctx, snr_gamma=5.0)
        same = finetune_unet.diffusion_loss(sd.unet, z0, noise, t, ctx, snr_gamma=1e9)
        ac = SD15.alphas_cumprod.double()[t]
        x_t = ac.sqrt().view(-1, 1, 1, 1) * z0.double() + (1 - ac).sqrt().view(-1, 1, 1, 1) * noise.double()
        err = (sd.unet(x_t.float(), t, ctx).double() - noise.double()).pow(2).mean(dim=(1, 2, 3))
    snr = ac / (1 - ac)
    assert snr[0] > 5 > snr[2]  # one step on each side of γ
    want = (err * torch.minimum(snr, torch.full_like(snr, 5.0)) / snr).mean()
    assert abs(weighted.item() - want.item()) < 1e-5 * want.item()
    assert abs(plain.item() - err.mean().item()) < 1e-5 * plain.item() and abs(same.item() - plain.item()) < 1e-6
    assert weighted < 0.9 * plain  # the nearly clean sample's weight is γ / SNR ≈ 0.02


def test_residual_penalty_adds_the_residuals_mean_square_and_shrinks_them():
    """--residual-penalty λ: the loss gains λ times the mean over residuals of each one's mean square;
    a few steps with it leave the residuals smaller than the same steps without."""
    sd = StableDiffusion.random("tiny", seed=0)
    g = torch.Generator().manual_seed(0)
    z0, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t, ctx = torch.tensor([10, 600]), torch.randn(2, 77, 32, generator=g)
    hint = torch.nn.functional.one_hot(torch.randint(0, 20, (2, RES, RES), generator=g), 20).permute(0, 3, 1, 2).float()
    unet = sd.unet.requires_grad_(False)
    base = ControlNet.from_unet(unet)
    with torch.no_grad():  # non-zero zero-convs: residuals to penalise from the start
        for p in list(base.zero_convs.parameters()) + list(base.middle_block_out.parameters()):
            p.normal_(0, 0.05, generator=g)
    with torch.no_grad():
        x_t = (SD15.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1) * z0
               + (1 - SD15.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1) * noise)
        control = base(x_t, hint, t, ctx)
        energy = sum(c.pow(2).mean() for c in control) / len(control)
        plain = train_controlnet.controlnet_loss(base, unet, z0, noise, t, ctx, hint)
        penalised = train_controlnet.controlnet_loss(base, unet, z0, noise, t, ctx, hint, residual_penalty=0.5)
    assert energy > 0 and abs(penalised - plain - 0.5 * energy) < 1e-5 * penalised
    after = {}
    for lam in (0.0, 40.0):
        cn = copy.deepcopy(base).requires_grad_(True)
        opt = torch.optim.SGD(cn.parameters(), lr=1e-2)
        for _ in range(5):
            opt.zero_grad()
            train_controlnet.controlnet_loss(cn, unet, z0, noise, t, ctx, hint, residual_penalty=lam).backward()
            opt.step()
        with torch.no_grad():
            after[lam] = train_controlnet.residual_energy(cn(x_t, hint, t, ctx)).item()
    assert after[40.0] < 0.7 * after[0.0], after


@pytest.mark.parametrize("mode, trained_blocks", [
    ("none", "all"), ("encoder", ()), ("encoder-but-first", ("input_blocks.1.", "input_blocks.2.", "input_blocks.3.")),
    ("encoder-but-middle", ("middle_block.",))])
def test_freeze_trains_the_original_partial_freeze_parts(gta, tmp_path, mode, trained_blocks):
    """--freeze (partial_freeze_expid 1, 2, 3): the hint encoder and zero convs always train; of the
    copied encoder half only the first level (tiny: two res blocks and the downsampler) or the middle
    block. Three steps (the zero convs open the path in the first) leave every frozen tensor as U^S's
    and move every trained one."""
    kw = dict(batch_size=2, grad_accum=1, freeze=mode)
    run_controlnet(gta, tmp_path / "start", max_steps=0, **kw)  # 0 steps: the export is the initial ControlNet
    start = load_controlnet(tmp_path / "start" / "controlnet.safetensors").state_dict()
    run_controlnet(gta, tmp_path / "run", max_steps=3, lr=1e-2, ckpt_every=3, **kw)
    after = _ckpt(tmp_path / "run", 3)["model"]
    always = ("input_hint_block.", "zero_convs.", "middle_block_out.")
    moved = {k for k in after if not torch.equal(after[k], start[k])}
    expected = set(after) if trained_blocks == "all" else {k for k in after if k.startswith(always + trained_blocks)}
    assert moved == expected, (sorted(moved ^ expected)[:6], mode)
    if mode == "encoder":  # resuming with other trained parameters is refused, naming both settings
        with pytest.raises(SystemExit, match=r"step_0*3.pt trained other parameters .*--freeze encoder -> none"):
            run_controlnet(gta, tmp_path / "run", max_steps=4, resume="auto", batch_size=2, grad_accum=1)
        # a checkpoint that does not record the mode: the optimizer's state does not fit, said in one line
        path = common.checkpoint_path(tmp_path / "run" / "checkpoints", 3)
        state = common.load_checkpoint(path)
        del state["config"]["freeze"]
        torch.save(state, path)
        with pytest.raises(SystemExit, match=r"optimizer state is for other trained parameters"):
            run_controlnet(gta, tmp_path / "run", max_steps=4, resume="auto", batch_size=2, grad_accum=1)


def test_gradient_checkpointing_gives_the_same_gradients(monkeypatch):
    import ldm.unet

    calls = []
    real = ldm.unet.checkpoint
    monkeypatch.setattr(ldm.unet, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    sd = StableDiffusion.random("tiny", seed=0)
    g = torch.Generator().manual_seed(0)
    z0, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t, ctx = torch.tensor([10, 900]), torch.randn(2, 77, 32, generator=g)
    hint = torch.nn.functional.one_hot(torch.randint(0, 20, (2, RES, RES), generator=g), 20).permute(0, 3, 1, 2).float()

    unet = sd.unet.train().requires_grad_(True)
    results = []
    for ckpt in (False, True):
        unet.gradient_checkpointing = ckpt
        unet.zero_grad()
        finetune_unet.diffusion_loss(unet, z0, noise, t, ctx).backward()
        results.append(_grads(unet))
    assert calls and results[0].keys() == results[1].keys() and len(results[0]) == len(list(unet.parameters()))
    for k in results[0]:
        assert torch.allclose(results[0][k], results[1][k], rtol=1e-5, atol=1e-7), k

    # ControlNet training: the frozen U-Net checkpoints too (in train mode), same ControlNet gradients
    unet.requires_grad_(False)
    cn = ControlNet.from_unet(unet)
    with torch.no_grad():  # non-zero zero-convs, so gradients reach the encoder copy
        for p in list(cn.zero_convs.parameters()) + list(cn.middle_block_out.parameters()):
            p.normal_(0, 0.02, generator=g)
        cn.input_hint_block[-1].weight.normal_(0, 0.02, generator=g)
    results, calls[:] = [], []
    for ckpt in (False, True):
        cn.gradient_checkpointing = unet.gradient_checkpointing = ckpt
        cn.zero_grad()
        train_controlnet.controlnet_loss(cn, unet, z0, noise, t, ctx, hint).backward()
        results.append(_grads(cn))
        if ckpt:  # both networks checkpointed their blocks
            assert len(calls) == 2 * len(unet.input_blocks) + 1 + len(unet.output_blocks) + 1
    assert len(results[0]) == len(list(cn.parameters()))
    for k in results[0]:
        assert torch.allclose(results[0][k], results[1][k], rtol=1e-5, atol=1e-7), k


def test_gradient_checkpointing_flag_in_the_scripts(gta, tmp_path, monkeypatch):
    import ldm.unet

    calls = []
    real = ldm.unet.checkpoint
    monkeypatch.setattr(ldm.unet, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    kw = dict(max_steps=2, batch_size=2, grad_accum=1, lr=1e-3, ckpt_every=2, no_export=True)
    plain = run_controlnet(gta, tmp_path / "plain", **kw)
    assert not calls
    ckpt = run_controlnet(gta, tmp_path / "ckpt", gradient_checkpointing=True, **kw)
    unet = StableDiffusion.random("tiny").unet
    per_step = 2 * len(unet.input_blocks) + 1 + len(unet.output_blocks) + 1  # ControlNet + frozen U-Net
    assert len(calls) == 2 * per_step
    for a, b in zip(plain, ckpt):
        assert abs(a["loss"] - b["loss"]) <= 1e-6 * a["loss"]
    a, b = _ckpt(tmp_path / "plain", 2)["model"], _ckpt(tmp_path / "ckpt", 2)["model"]
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_gradient_accumulation_equals_the_large_batch(gta, tmp_path):
    """One optimizer step with 4 items as 4x1, 2x2 and 1x4: Adam's first moment is 0.1 * the
    (clipped) gradient, so the checkpoints must agree."""
    moments = {}
    for bs, acc in ((4, 1), (2, 2), (1, 4)):
        out = tmp_path / f"b{bs}a{acc}"
        run_controlnet(gta, out, batch_size=bs, grad_accum=acc, max_steps=1, max_grad_norm=1e9, no_export=True,
                       proportion_empty_prompts=0.5)
        opt = _ckpt(out, 1)["optimizer"]["state"]
        moments[(bs, acc)] = torch.cat([s["exp_avg"].flatten() for s in opt.values()])
        assert len(common.read_metrics(out)[0]["samples"][0]) == bs  # micro-batch size really changed
    big = moments[(4, 1)]
    assert big.abs().max() > 0
    for key in ((2, 2), (1, 4)):
        assert rel_err(moments[key], big) < 1e-5, key  # float summation order only


# ---------------------------------------------------------------------------------------
# End-to-end runs
# ---------------------------------------------------------------------------------------

def test_finetune_overfits_one_image(tmp_path):
    Image.fromarray(_scene(0)[0]).save(tmp_path / "only.png")
    losses = [m["loss"] for m in run_finetune(tmp_path, tmp_path / "out", max_steps=60, batch_size=4, grad_accum=1,
                                              lr=2e-3, scales=[1.0], center_crop=True, no_export=True)]
    assert len(losses) == 60
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    assert last < 0.5 * first, (first, last)


@pytest.mark.parametrize("script", ["finetune", "controlnet"])
def test_resume_is_bit_identical(gta, tmp_path, script):
    run, data, kw = ((run_finetune, gta / "images", {}) if script == "finetune"
                     else (run_controlnet, gta, {"proportion_empty_prompts": 0.3}))
    kw.update(batch_size=2, grad_accum=2, ema=True, ema_decay=0.5, lr=1e-3, ckpt_every=2, no_export=True)
    full = run(data, tmp_path / "full", max_steps=4, **kw)
    run(data, tmp_path / "cut", max_steps=3, **kw)
    (tmp_path / "cut" / "checkpoints" / "step_0000003.pt").unlink()  # as if killed after logging step 3
    resumed = run(data, tmp_path / "cut", max_steps=4, resume="auto", num_workers=1, **kw)  # workers: same items
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]
    assert [m["loss"] for m in resumed] == [m["loss"] for m in full]
    assert [m["samples"] for m in resumed] == [m["samples"] for m in full]
    a, b = _ckpt(tmp_path / "full", 4), _ckpt(tmp_path / "cut", 4)
    for key in ("model", "ema", "optimizer", "scaler"):
        _assert_same_tensors(a[key], b[key], key)
    assert not torch.equal(next(iter(a["model"].values())), next(iter(_ckpt(tmp_path / "cut", 2)["model"].values())))
    assert "resumed from" in (tmp_path / "cut" / "log.txt").read_text()


def test_finetune_exports_load_back(gta, tmp_path):
    out = tmp_path / "out"
    run_finetune(gta / "images", out, max_steps=2, lr=1e-3, ema=True, ema_decay=0.5, ckpt_every=2)
    ema = _ckpt(out, 2)["ema"]
    native = ckpt_io.load_unet(out / "unet.safetensors")
    _assert_same_tensors(native.state_dict(), ema)
    assert not all(torch.equal(ema[k], v) for k, v in StableDiffusion.random("tiny", seed=0).unet.state_dict().items())
    for path in (out / "diffusers", out / "sd15_unet_s.safetensors"):
        parts = ckpt_io.load_components(path)
        assert set(parts) == {"unet", "vae", "text_encoder"}
        for k, v in parts["unet"].state_dict().items():
            assert torch.allclose(v, ema[k], atol=1e-6), (path, k)
    assert json.loads((out / "diffusers" / "model_index.json").read_text())["unet"] == ["diffusers",
                                                                                         "UNet2DConditionModel"]


def test_controlnet_exports_swap_validation_and_init(gta, tmp_path, tiny_prior):
    out = tmp_path / "out"
    run_controlnet(gta, out, max_steps=2, lr=1e-3, ckpt_every=2, prior=tiny_prior, validation_every=2,
                   validation_steps=2, validation_images=1, num_validation=2, batch_size=2, grad_accum=1)
    trained = _ckpt(out, 2)["model"]
    for path in (out / "controlnet.safetensors", out / "controlnet"):
        cn = load_controlnet(path)
        assert cn.control_cfg.hint_channels == 20
        _assert_same_tensors(cn.state_dict(), trained)
    # validation grid: 2 label rows x (label | U^S | U^P); the swapped U-Net renders other images
    grid = np.asarray(Image.open(out / "validation" / "step_0000002.png"))
    assert grid.shape == (2 * RES, 3 * RES, 3)
    label_tile, on_s, on_p = (grid[:RES, i * RES:(i + 1) * RES].astype(int) for i in range(3))
    assert np.abs(on_s - on_p).mean() > 1 and np.abs(on_s - label_tile).mean() > 1
    stats = json.loads((out / "label_stats.json").read_text())["pixels"]
    assert sum(stats.values()) == 2 * 2 * RES * RES and stats["road"] > 0
    # --controlnet PATH starts from those weights (0 steps: the export is the input)
    run_controlnet(gta, tmp_path / "init", max_steps=0, controlnet=out / "controlnet.safetensors")
    _assert_same_tensors(load_controlnet(tmp_path / "init" / "controlnet.safetensors").state_dict(), trained)


def test_latent_cache_gives_the_same_training(gta, tmp_path):
    kw = dict(crop="center", max_steps=2, batch_size=2, grad_accum=1, no_export=True)
    plain = run_controlnet(gta, tmp_path / "plain", **kw)
    cached = run_controlnet(gta, tmp_path / "cached", cache_latents=tmp_path / "cache", **kw)
    again = run_controlnet(gta, tmp_path / "again", cache_latents=tmp_path / "cache", **kw)  # reuses the entries
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 6
    for a, b in zip(plain, cached):
        assert a["samples"] == b["samples"] and abs(a["loss"] - b["loss"]) < 1e-5 * a["loss"]
    assert [m["loss"] for m in again] == [m["loss"] for m in cached]
    assert "0 new entries" in (tmp_path / "again" / "log.txt").read_text()
    with pytest.raises(ValueError, match="single resize ratio"):
        run_controlnet(gta, tmp_path / "ratios", max_steps=1, cache_latents=tmp_path / "cache",
                       resize_ratios=[0.5, 1.0])


def test_finetune_caches_whole_images_and_their_mirrors(gta, tmp_path):
    metrics = run_finetune(gta / "images", tmp_path / "run", max_steps=2, scales=[1.0], random_flip=True,
                           cache_latents=tmp_path / "cache", no_export=True)
    assert len(metrics) == 2 and all(np.isfinite(m["loss"]) for m in metrics)
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 2 * 6  # six images, plain and mirrored


def test_latent_cache_rare_class_crops(gta, tmp_path):
    """RCS crops with a cache: the label is cut at the snapped origin, and the latents are the same crop's."""
    f = 8
    _, pairs = discover_pairs(gta)
    kw = dict(seed=3, stats=pair_class_stats(pairs, cache_dir=tmp_path / "rcs"), rcs_min_pixels=50)
    plain = ControlNetDataset(pairs, RES, "rcs", **kw)
    cached = ControlNetDataset(pairs, RES, "rcs", cache=LatentCache(tmp_path / "cache", "pool", f), **kw)
    fill_latent_cache(cached, _PoolVAE(f), "cpu")
    for e in range(10):
        a, b = plain[(e, 0)], cached[(e, 0)]
        (x0, y0), (x1, y1) = _origin(a["desc"]), _origin(b["desc"])
        assert (x1, y1) == (x0 - x0 % f, y0 - y0 % f) and a["seed"] == b["seed"]
        image, label = plain._load(int(b["desc"].split("@")[0][:5]), 1.0)
        assert torch.equal(b["label"], torch.from_numpy(label[y1:y1 + RES, x1:x1 + RES]))
        assert torch.allclose(b["moments"], _pool(to_tensor(image[y1:y1 + RES, x1:x1 + RES]), f), atol=1e-6)
    # and a ControlNet trains on them
    metrics = run_controlnet(gta, tmp_path / "run", max_steps=2, batch_size=2, grad_accum=1, no_export=True,
                             cache_latents=tmp_path / "cache2")
    assert len(metrics) == 2 and all(np.isfinite(m["loss"]) for m in metrics)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs(gta, tmp_path, precision):
    metrics = run_finetune(gta / "images", tmp_path, max_steps=2, mixed_precision=precision, no_export=True,
                           gradient_checkpointing=True)
    assert len(metrics) == 2 and all(np.isfinite(m["loss"]) for m in metrics)
    state = _ckpt(tmp_path, 2) if (tmp_path / "checkpoints").exists() else None
    assert state is not None and next(iter(state["model"].values())).dtype == torch.float32  # fp32 master weights
    if precision == "fp16":
        assert state["scaler"]["scale"] > 0  # the GradScaler is live


def _reference_first_moment(script: str, gta: Path, world: int, bs: int, acc: int) -> torch.Tensor:
    """Adam's first moment after one step (0.1 x the gradient), computed by hand: every rank's items
    (same keys as the script's sampler), accumulated, averaged over ranks as DDP's all-reduce does."""
    torch.manual_seed(0)  # rank 0's seed (0 * world + 0): DDP broadcasts rank 0's initial weights
    sd = StableDiffusion.random("tiny", seed=0)
    if script == "controlnet":
        _, pairs = discover_pairs(gta)
        stats = pair_class_stats(pairs)
        net = ControlNet.from_unet(sd.unet).train()
        sets = [ControlNetDataset(pairs, RES, "rcs", seed=0, rank=r, stats=stats, rcs_min_pixels=50)
                for r in range(world)]
    else:
        net = sd.unet.train().requires_grad_(True)
        sets = [ImageDataset(find_images(gta / "images"), RES, seed=0, rank=r) for r in range(world)]
        empty = sd.text_encoder(sd.tokenizer([""])).detach()
    for r, ds in enumerate(sets):
        keys = iter(ShardSampler(len(ds), r, world, seed=0))
        for _ in range(acc):
            batch = default_collate([ds[next(keys)] for _ in range(bs)])
            z0, noise, t = diffusion_inputs(batch, sd.vae, "cpu")
            if script == "controlnet":
                with torch.no_grad():
                    ctx = sd.text_encoder(sd.tokenizer(list(batch["caption"])))
                loss = train_controlnet.controlnet_loss(net, sd.unet, z0, noise, t, ctx, one_hot(batch["label"]))
            else:
                loss = finetune_unet.diffusion_loss(net, z0, noise, t, empty.expand(bs, -1, -1))
            (loss / acc / world).backward()
    return 0.1 * torch.cat([p.grad.flatten() for p in net.parameters()])


@pytest.mark.parametrize("script", ["controlnet", "finetune"])
def test_two_processes_gloo(gta, tmp_path, script):
    """torchrun with 2 CPU processes: DDP over gloo, accumulation with no_sync, distinct items per
    rank, and the update equals the by-hand average of both ranks' accumulated gradients."""
    out = tmp_path / "out"
    module, data = ("train.train_controlnet", gta) if script == "controlnet" else ("train.finetune_unet", gta / "images")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", module,
           "--tiny", "--data", str(data), "--output-dir", str(out), "--resolution", str(RES), "--num-workers", "0",
           "--log-every", "1", "--batch-size", "1", "--grad-accum", "2", "--max-steps", "2", "--ckpt-every", "1",
           "--lr", "1e-3", "--max-grad-norm", "1e9"]
    cmd += ["--validation-every", "0", "--rcs-min-pixels", "50"] if script == "controlnet" else ["--sample-every", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = common.read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        rank0, rank1 = m["samples"]
        assert len(rank0) == len(rank1) == 1 and rank0 != rank1
    ck = _ckpt(out, 2)
    assert ck["world_size"] == 2 and len(ck["rng"]) == 2
    assert not torch.equal(ck["rng"][0]["torch"], ck["rng"][1]["torch"])  # seeded per rank
    assert (out / "log.txt").read_text().count("step       2") == 1  # rank 0 logs alone
    opt = _ckpt(out, 1)["optimizer"]["state"]
    got = torch.cat([opt[i]["exp_avg"].flatten() for i in range(len(opt))])
    assert rel_err(got, _reference_first_moment(script, gta, 2, 1, 2)) < 1e-5
    if script == "controlnet":
        _assert_same_tensors(load_controlnet(out / "controlnet.safetensors").state_dict(), ck["model"])
    else:
        _assert_same_tensors(ckpt_io.load_unet(out / "unet.safetensors").state_dict(), ck["model"])


# ---------------------------------------------------------------------------------------
# Faults: divergence, changed settings on resume, unreadable checkpoints, leftovers
# ---------------------------------------------------------------------------------------

def _all_finite(state) -> bool:
    return all(torch.isfinite(v).all() for v in state.values() if torch.is_tensor(v) and v.is_floating_point())


def test_divergence_stops_with_an_error_and_keeps_the_finite_checkpoints(gta, tmp_path):
    """--lr 1e4 diverges within a few steps: the run stops with one clear error, every checkpoint left is
    finite (the rotation never deletes the last finite one) and nothing is exported."""
    out = tmp_path / "out"
    with pytest.raises(common.TrainingDiverged, match=r"non-finite.*--lr") as e:
        run_controlnet(gta, out, lr=1e4, max_steps=40, ckpt_every=1, keep_last=2, batch_size=2, grad_accum=1,
                       max_bad_steps=3)
    assert "\n" not in str(e.value)
    kept = common.list_checkpoints(out / "checkpoints")
    assert kept and all(_all_finite(common.load_checkpoint(p)["model"]) for p in kept)
    assert not (out / "controlnet.safetensors").exists() and not (out / "controlnet").exists()
    log = (out / "log.txt").read_text()
    assert "skipped" in log and "non-finite" in log


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_non_finite_steps_are_skipped_then_the_run_stops(gta, tmp_path, monkeypatch, precision):
    """A NaN loss skips its update (weights untouched, as AMP's loss scaling does under fp16); N in a row
    stop the run."""
    real = finetune_unet.diffusion_loss
    calls = []

    def loss(*a):
        calls.append(1)
        value = real(*a)
        return value * float("nan") if len(calls) in (3, 5, 6) or len(calls) >= 9 else value

    monkeypatch.setattr(finetune_unet, "diffusion_loss", loss)
    out = tmp_path / "out"
    with pytest.raises(common.TrainingDiverged, match="3 optimizer steps in a row"):
        run_finetune(gta / "images", out, max_steps=20, batch_size=1, grad_accum=1, ckpt_every=1, keep_last=100,
                     lr=1e-3, max_bad_steps=3, mixed_precision=precision, no_export=True)
    steps = {int(p.stem[5:]): common.load_checkpoint(p)["model"] for p in common.list_checkpoints(out / "checkpoints")}
    assert all(_all_finite(m) for m in steps.values())
    same = lambda a, b: all(torch.equal(a[k], b[k]) for k in a)  # noqa: E731
    assert same(steps[2], steps[3]) and not same(steps[3], steps[4])  # step 3 skipped, step 4 trained
    assert same(steps[4], steps[6]) and not same(steps[6], steps[7])  # two bad steps in a row do not stop
    assert max(steps) == 10 and same(steps[8], steps[10])  # 9, 10 skipped; the third in a row (11) stops
    assert "3 optimizer steps in a row" in (out / "log.txt").read_text()


def test_resume_applies_changed_hyper_parameters_and_says_so(gta, tmp_path):
    out = tmp_path / "out"
    run_finetune(gta / "images", out, max_steps=2, lr=2e-6, ckpt_every=1, no_export=True)
    metrics = run_finetune(gta / "images", out, max_steps=3, lr=1e-3, batch_size=2, resume="auto", no_export=True)
    assert [m["lr"] for m in metrics] == [2e-6, 2e-6, 1e-3]
    assert len(metrics[-1]["samples"][0]) == 2
    log = (out / "log.txt").read_text()
    assert "lr: 2e-06 -> 0.001" in log and "batch_size: 1 -> 2" in log


def test_resume_auto_falls_back_from_an_unreadable_checkpoint(gta, tmp_path):
    kw = dict(max_steps=3, lr=1e-3, ckpt_every=1, no_export=True)
    run_finetune(gta / "images", tmp_path / "full", **kw)
    out = tmp_path / "out"
    run_finetune(gta / "images", out, **{**kw, "max_steps": 2})
    latest = common.checkpoint_path(out / "checkpoints", 2)
    latest.write_bytes(latest.read_bytes()[:1000])  # a checkpoint cut short (a disk that filled up, a copy)
    with pytest.raises(Exception, match="step_0000002.pt"):
        run_finetune(gta / "images", out, **kw, resume=str(latest))  # asked for by name: an error naming it
    run_finetune(gta / "images", out, **kw, resume="auto")
    log = (out / "log.txt").read_text()
    assert "step_0000002.pt" in log and "falling back to" in log and "step_0000001.pt" in log
    _assert_same_tensors(_ckpt(out, 3)["model"], _ckpt(tmp_path / "full", 3)["model"])
    assert (out / "checkpoints" / "step_0000002.pt.unreadable").exists()  # kept aside, out of the rotation


def test_resume_removes_what_a_killed_export_left(gta, tmp_path):
    out = tmp_path / "out"
    run_finetune(gta / "images", out, max_steps=1, ckpt_every=1, no_export=True)
    stale = out / ".controlnet.12345-0badf00d.tmp"
    (stale / "unet").mkdir(parents=True)
    os.utime(stale, (1, 1))
    run_finetune(gta / "images", out, max_steps=2, resume="auto", no_export=True)
    assert not stale.exists()


def test_training_logs_progress_eta_and_says_whether_tensorboard_writes(gta, tmp_path, monkeypatch):
    import types

    scalars = []

    class Writer:
        def __init__(self, logdir):
            self.logdir = logdir

        def add_scalar(self, tag, value, step):
            scalars.append((tag, step))

        def add_image(self, *a, **k):
            pass

        def close(self):
            pass

    run_finetune(gta / "images", tmp_path / "a", max_steps=2, no_export=True)
    log = (tmp_path / "a" / "log.txt").read_text()
    assert "step       2/2" in log and "ETA" in log and "samples_per_s" in log
    assert "TensorBoard" in log  # on or off, the log says so
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    run_finetune(gta / "images", tmp_path / "b", max_steps=2, no_export=True)
    assert ("loss", 1) in scalars and ("loss", 2) in scalars
    assert "TensorBoard" in finetune_unet.get_parser().format_help()


@pytest.mark.parametrize("bad", [["--batch-size", "0"], ["--grad-accum", "0"], ["--max-steps", "-1"], ["--lr", "nan"],
                                 ["--lr", "0"], ["--ema-decay", "1.5"], ["--resolution", "0"], ["--keep-last", "-1"],
                                 ["--max-bad-steps", "0"]])
@pytest.mark.parametrize("module", [finetune_unet, train_controlnet])
def test_numbers_are_checked_when_parsed(module, bad, capsys):
    with pytest.raises(SystemExit) as e:
        module.get_parser().parse_args(["--tiny", "--data", "x", "--output-dir", "y", *bad])
    assert e.value.code == 2 and bad[0] in capsys.readouterr().err
