"""DIFF (segmentation.models.diff): the inversion grid and its η rule, the inversion step, the hooked
features against a direct step-by-step computation, the fusion at SD-1.5 size, the IPKL loss, the
head-only checkpoints with their reference to the frozen weights, and the training script."""
import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from safetensors import safe_open

from ldm import checkpoint
from ldm.config import UNetConfig
from ldm.layers import Upsample
from ldm.sd import StableDiffusion
from ldm.weights import CheckpointError
from samplers import SD15, ddim_invert_step, ddim_step, eps_from_v, windowed_eta
from segmentation.datasets import SegDataset
from segmentation.evaluate import evaluate_dataset
from segmentation.labels import CLASS_NAMES
from segmentation.metrics import mean_iou
from segmentation.models import PRESETS, DIFFConfig, build_segmentor, load_segmentor, save_segmentor
from segmentation.models.diff import (Bottleneck, DIFFFusion, DIFFSegmentor, DiffusionFeatures, feature_channels,
                                      feature_modules)
from segmentation.models.heads import DAFormerHead
from tests.test_seg_train import write_scenes
from train.train_segmentation import main, parse_args

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sd_file(tmp_path_factory):
    """A random tiny SD (U-Net, VAE, text encoder) as one native file."""
    sd = StableDiffusion.random("tiny", seed=0)
    path = tmp_path_factory.mktemp("sd") / "tiny_sd.safetensors"
    return checkpoint.save_native(path, {"unet": sd.unet, "vae": sd.vae, "text_encoder": sd.text_encoder})


def diff_config(sd_file, **changes) -> DIFFConfig:
    return replace(PRESETS["diff_tiny"].diff, unet=str(sd_file), **changes)


def segmentor_config(sd_file, **changes):
    return replace(PRESETS["diff_tiny"], diff=diff_config(sd_file, **changes))


# ---------------------------------------------------------------------------------------------- the inversion
def test_inversion_grid_eta_rule_and_feature_steps():
    cfg = DIFFConfig()
    grid = cfg.timesteps
    assert grid == (*range(24), 26, 30, 34, 40, 45, 52, 60, 69, 80, 91, 105, 121, 139, 160)
    starts = grid[:-1]  # the U-Net runs at these, each step going to the next grid point
    assert len(starts) == 37 and starts[-1] == 139
    # the original's save_timestep (step indices) are these grid points
    assert [starts.index(t) for t in cfg.feature_timesteps] == [33, 29, 25, 22, 18, 14, 11, 7, 3]
    eta = [windowed_eta(t, cfg.eta, cfg.eta_window) for t in starts]
    assert eta == [0.0] * 11 + [1.0] * 26  # eta 1 where 10 < t < 250: from t = 11 on
    assert windowed_eta(250, 1.0, (10, 250)) == 0.0 and windowed_eta(249, 1.0, (10, 250)) == 1.0
    assert windowed_eta(5, 0.3) == 0.3  # no window: everywhere


def _unet_timesteps(feats) -> list[int]:
    """The timestep of every U-Net call of one feature extraction."""
    seen = []
    handle = feats.unet.register_forward_pre_hook(lambda m, args: seen.append(int(args[1])))
    try:
        feats(torch.randn(1, 4, 8, 8))
    finally:
        handle.remove()
    return seen


def test_the_extractor_runs_the_grid_up_to_the_last_feature_step(sd_file):
    feats = DiffusionFeatures.load(diff_config(sd_file, timesteps=DIFFConfig().timesteps,
                                               feature_timesteps=DIFFConfig().feature_timesteps))
    seen = _unet_timesteps(feats)
    assert seen == [*range(24), 26, 30, 34, 40, 45, 52, 60, 69, 80, 91]  # 105, 121, 139 change no feature


def test_world_grid_reads_the_feature_timesteps_with_10_calls(sd_file):
    cfg = PRESETS["diff_world"].diff
    assert cfg.feature_timesteps == DIFFConfig().feature_timesteps  # DIFF's nine, in DIFF's order
    feats = DiffusionFeatures.load(replace(cfg, unet=str(sd_file)))
    seen = _unet_timesteps(feats)
    assert seen == [0, 3, 7, 11, 14, 18, 22, 30, 52, 91]


def test_world_grid_moves_the_features_less_than_the_inversion_noise(tmp_path):
    """On the shipped world prior and source scenes, the features of diff_world's short grid are as close
    to the full grid's as two runs of the full grid with different inversion noise are to each other
    (relative L2 per decoder level; the posterior mean, so the inversion is the only difference)."""
    from mrlf.bundle import SHIPPED, load_bundle
    from segmentation.world import WorldSpec, write_world

    world = write_world(tmp_path / "world", WorldSpec(source=8, prior=0, eval=0, oracle=0, styles=0))
    data = SegDataset(world / "source", "gta")
    scenes = [torch.from_numpy(data.load(i)[0].copy()) for i in range(0, 8, 2)]  # the base-size ones (64 x 128)
    x = torch.stack(scenes).permute(0, 3, 1, 2).float() / 127.5 - 1
    full = replace(PRESETS["diff_mini"].diff, unet=str(load_bundle(SHIPPED)["prior"]), posterior="mean")
    base = DiffusionFeatures.load(full)
    z = base.latents(x)

    def features(timesteps, seed):
        extractor = DiffusionFeatures(replace(full, timesteps=timesteps), base.unet, base.vae, base.contexts)
        return extractor(z, generator=torch.Generator().manual_seed(seed))

    a, b = features(full.timesteps, 1), features(full.timesteps, 2)
    short = features(PRESETS["diff_world"].diff.timesteps, 1)
    for level in range(3):
        noise = (a[level] - b[level]).norm() / a[level].norm()
        grid = (a[level] - short[level]).norm() / a[level].norm()
        assert 0.01 < noise < 0.5 and grid < 1.1 * noise, (level, float(grid), float(noise))


def test_invert_step_is_the_hand_formula():
    g = torch.Generator().manual_seed(0)
    x, eps, noise = (torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(3))
    for t, t_next in [(0, 1), (23, 26), (52, 60), (139, 160), (400, 990)]:
        at, an = SD15.alphas_cumprod[t].double(), SD15.alphas_cumprod[t_next].double()
        for eta in (0.0, 1.0):
            x0 = (x - eps * (1 - at).sqrt()) / at.sqrt()
            c1 = eta * ((1 - an / at) * (1 - an) / (1 - at)).sqrt()
            c2 = torch.clamp((1 - an) - c1**2, min=1e-10).sqrt()
            want = an.sqrt() * x0 + c1 * noise + c2 * eps
            got = ddim_invert_step(x, eps, at, an, eta, noise if eta else None)
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # (400, 990) with eta 1 is where sigma^2 > 1 - a_next: the floor keeps the step finite
    at, an = SD15.alphas_cumprod[400].double(), SD15.alphas_cumprod[990].double()
    assert an < at**2 and torch.isfinite(ddim_invert_step(x, eps, at, an, 1.0, noise)).all()
    # downwards it is the plain DDIM step
    at, ap = SD15.alphas_cumprod[601].double(), SD15.alphas_cumprod[551].double()
    torch.testing.assert_close(ddim_invert_step(x, eps, at, ap, 1.0, noise), ddim_step(x, eps, at, ap, 1.0, noise))
    with pytest.raises(ValueError, match="noise"):
        ddim_invert_step(x, eps, at, ap, 1.0)


def test_eps_from_v():
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64), torch.randn(2, 4, 8, 8, generator=g,
                                                                                      dtype=torch.float64)
    a = SD15.alphas_cumprod[700].double()
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    v = a.sqrt() * eps - (1 - a).sqrt() * x0
    torch.testing.assert_close(eps_from_v(x_t, v, a), eps)


# ---------------------------------------------------------------------------------------------- the features
def direct_unet(unet, x, t, context):
    """The U-Net forward written out module by module, out of place: (output, {module name: its output})."""
    got = {}
    emb = unet.time_embedding(t, x)
    skips, h = unet.encode(x, emb, context)
    for n, block in enumerate(unet.output_blocks):
        h = torch.cat([h, skips.pop()], dim=1)
        res = block[0]
        branch = res.out_layers(res.in_layers(h) + res.emb_layers(emb)[:, :, None, None])
        got[f"output_blocks.{n}.0.out_layers"] = branch
        h = res.skip_connection(h) + branch
        for layer in block[1:]:
            if isinstance(layer, Upsample):
                h = layer(h)
                continue
            hh, ww = h.shape[-2:]
            y = rearrange(layer.proj_in(layer.norm(h)), "b c h w -> b (h w) c")
            for i, tb in enumerate(layer.transformer_blocks):
                y = tb(y, context)
                if i == 0:
                    got[f"output_blocks.{n}.1.transformer_blocks.0"] = y
            h = layer.proj_out(rearrange(y, "b (h w) c -> b c h w", h=hh, w=ww)) + h
    return unet.out(h), got


def direct_features(feats: DiffusionFeatures, z, label, generator):
    """DIFF's inversion and feature reading, step by step with the hand formulas: the U-Net batch
    [negative prompt, class prompts present]; every class prompt's guided eps and the empty
    prompt's eps each make a DDIM step (its own noise), averaged where the classes' masks are."""
    cfg, unet, b = feats.cfg, feats.unet, z.shape[0]
    assert cfg.prompt == cfg.negative_prompt == ""
    prompts, masks = [""], [torch.ones_like(z[:, :1])]
    if label is not None:
        for c in cfg.ipkl_classes:
            if (label == c).any():
                prompts.append(cfg.class_prompt.format(name=CLASS_NAMES[c]))
                small = F.interpolate((label[:, None] == c).float(), size=z.shape[-2:], mode="nearest")
                masks.append(small)
    e = len(prompts)
    context = torch.cat([feats.contexts[p].expand(b, -1, -1) for p in prompts])
    read = {}
    x = z.double()
    grid = cfg.timesteps
    for i, t in enumerate(grid[:-1]):
        out, got = direct_unet(unet, x.repeat(e, 1, 1, 1).float(), t, context)
        if t in cfg.feature_timesteps:
            read[t] = got
        if i == max(grid.index(s) for s in cfg.feature_timesteps):
            break
        at, an = SD15.alphas_cumprod[t].double(), SD15.alphas_cumprod[grid[i + 1]].double()
        out = out.double()
        if cfg.prediction_type == "v_prediction":
            out = at.sqrt() * out + (1 - at).sqrt() * x.repeat(e, 1, 1, 1)
        eps_u = out[:b]
        eps = [eps_u] + [eps_u + cfg.guidance * (out[k * b:(k + 1) * b] - eps_u) for k in range(1, e)]
        eta = cfg.eta if cfg.eta_window[0] < t < cfg.eta_window[1] else 0.0
        noise = torch.randn((e * b, *x.shape[1:]), generator=generator).double() if eta > 0 else None
        value = count = 0
        for k in range(e):
            x0 = (x - eps[k] * (1 - at).sqrt()) / at.sqrt()
            c1 = eta * ((1 - an / at) * (1 - an) / (1 - at)).sqrt()
            c2 = torch.clamp((1 - an) - c1**2, min=1e-10).sqrt()
            step = an.sqrt() * x0 + c2 * eps[k] + (c1 * noise[k * b:(k + 1) * b] if eta > 0 else 0)
            value, count = value + step * masks[k], count + masks[k]
        x = value / count
    levels = []
    for level, names in enumerate(feature_modules(unet.cfg)):
        parts = []
        for name in names:
            for t in cfg.feature_timesteps:
                f = read[t][name]
                if ".transformer_blocks." in name:  # summed over entries, the empty prompt counted twice
                    h = z.shape[-2] >> level
                    f = rearrange(f, "(e b) (h w) c -> e b c h w", e=e, h=h)
                    f = f[0] * 2 + f[1:].sum(0)
                else:
                    f = f[:b]
                parts.append(f)
        levels.append(torch.cat(parts, dim=1))
    return levels


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("with_label", [False, True])
def test_hooked_features_equal_a_direct_computation(sd_file, prediction_type, with_label):
    """The real grid (37 steps, features at 9 of them) on the tiny U-Net, unconditional and with
    class prompts (two of the prompted classes present), both prediction types."""
    feats = DiffusionFeatures.load(diff_config(sd_file, timesteps=DIFFConfig().timesteps,
                                               feature_timesteps=DIFFConfig().feature_timesteps,
                                               prediction_type=prediction_type))
    z = torch.randn(2, 4, 8, 16, generator=torch.Generator().manual_seed(3))
    label = None
    if with_label:
        label = torch.full((2, 64, 128), 255, dtype=torch.long)
        label[0, :, :40] = 1  # sidewalk (prompted)
        label[1, 20:, 60:] = 14  # truck (prompted)
        label[:, :10] = 0  # road (not prompted)
    got = feats(z, label, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = direct_features(feats, z, label, torch.Generator().manual_seed(7))
    assert [tuple(f.shape) for f in got] == [(2, c, 8 >> lv, 16 >> lv) for lv, c in enumerate(feats.channels)]
    # tiny U-Net (32, 64, 64; attention at the two finest levels): 6, 6 and 3 modules x 9 timesteps
    assert feats.channels == (6 * 9 * 32, 6 * 9 * 64, 3 * 9 * 64)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w.double(), rtol=1e-4, atol=1e-5)
    assert all(torch.isfinite(g).all() and g.abs().amax() > 0 for g in got)


def test_conditional_pass_needs_a_prompted_class(sd_file):
    """Without a prompted class in the labels the conditional pass is the unconditional one; with
    one it differs."""
    feats = DiffusionFeatures.load(diff_config(sd_file))
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    uncond = feats(z, generator=torch.Generator().manual_seed(1))
    road = torch.zeros(1, 64, 64, dtype=torch.long)  # road: not in ipkl_classes
    same = feats(z, road, generator=torch.Generator().manual_seed(1))
    wall = road.clone()
    wall[:, :, 32:] = 3
    other = feats(z, wall, generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip(uncond, same))
    assert not torch.equal(uncond[0], other[0])


def test_feature_modules_follow_the_checkpoint_names():
    names = feature_modules(UNetConfig())
    assert names[0] == [f"output_blocks.{n}.0.out_layers" for n in (9, 10, 11)] \
        + [f"output_blocks.{n}.1.transformer_blocks.0" for n in (9, 10, 11)]
    assert names[2][0] == "output_blocks.3.0.out_layers" and len(names) == 3  # stride 64 (blocks 0-2) not read
    with pytest.raises(ValueError, match="3 decoder levels"):
        feature_modules(UNetConfig(channels=(32, 64), attention_levels=(True, True), num_heads=(2, 2), norm_groups=8))


# ---------------------------------------------------------------------------------------------- the fusion
def test_fusion_at_sd15_size_on_the_meta_device():
    """SD-1.5 features (9 timesteps): 17280 / 34560 / 69120 channels at strides 8 / 16 / 32; the
    fusion's shapes and parameter counts, against the original's aggregation with its stride-64
    branch (about 329 M)."""
    cfg = DIFFConfig()
    channels = feature_channels(UNetConfig(), len(cfg.feature_timesteps))
    assert channels == (17280, 34560, 69120)
    with torch.device("meta"):
        fusion = DIFFFusion(cfg, channels)
        head = DAFormerHead(fusion.out_channels)
        stride64 = Bottleneck(3 * 9 * 1280, 2048, 512, 16)  # the original's 3 ResBlocks of the 1280-wide level
        feats = [torch.empty(2, c, 64 >> i, 64 >> i) for i, c in enumerate(channels)]
        out = fusion(feats)
        logits = head(out)
    assert fusion.out_channels == (256, 512, 1024, 2048)
    assert [tuple(f.shape) for f in out] == [(2, 256, 128, 128), (2, 512, 64, 64), (2, 1024, 32, 32), (2, 2048, 16, 16)]
    assert tuple(logits.shape) == (2, 19, 128, 128)

    def count(m):
        return sum(p.numel() for p in m.parameters())

    def bottleneck(cin, cout):  # conv1, conv2, conv3, shortcut (no bias) + 4 GroupNorms
        w = cout // 4
        return cin * w + 9 * w * w + w * cout + cin * cout + 2 * (2 * w + 2 * cout)

    aggregation = [count(a) for a in fusion.aggregation]
    assert aggregation == [bottleneck(c, p) for c, p in zip(channels, cfg.projection_dims)]
    assert count(stride64) == bottleneck(34560, 2048)
    original = sum(aggregation) + count(stride64)
    assert 328e6 < original < 330e6  # the original's aggregation, stride-64 branch included
    up = [(2048, 1024), (1024, 512), (512, 256)]  # transposed 4x4 conv + a residual block of two 3x3 convs
    finecoder = sum(ci * co * 16 + co + 2 * (co * co * 9 + co) + 4 * co for ci, co in up) + 2 * (512 + 1024 + 2048)
    assert count(fusion.finecoder) == finecoder
    print(f"\nDIFF fusion at SD-1.5 size: aggregation {sum(aggregation) / 1e6:.1f} M (the original's "
          f"{original / 1e6:.1f} M with its stride-64 branch of {count(stride64) / 1e6:.1f} M), finecoder "
          f"{finecoder / 1e6:.1f} M, DAFormer head {count(head) / 1e6:.2f} M; trainable in all "
          f"{(count(fusion) + count(head)) / 1e6:.1f} M")


# ---------------------------------------------------------------------------------------------- IPKL
def test_ipkl_loss_is_the_hand_computation(sd_file):
    torch.manual_seed(0)
    model = build_segmentor(segmentor_config(sd_file)).train()
    x = torch.randn(2, 3, 48, 64)  # padded to 64 x 64 inside (the tiny SD's inputs are multiples of 32)
    label = torch.randint(0, 19, (2, 48, 64))
    label[0, :8] = 255
    label[1, :, :20] = 3  # wall: prompted
    torch.manual_seed(1)
    out = model(x, label)
    # the same draws by hand: latents, conditional pass, its head, unconditional pass, its head
    torch.manual_seed(1)
    xp, lp = F.pad(x, (0, 0, 0, 16)), F.pad(label, (0, 0, 0, 16), value=255)
    z = model.backbone.latents(xp)
    cond = model.decode_head(model.backbone(xp, lp, latents=z))
    uncond = model.decode_head(model.backbone(xp, latents=z))

    def ce(logits):
        logits = F.interpolate(logits, size=(64, 64), mode="bilinear", align_corners=False)
        logp = logits.log_softmax(1)
        valid = lp != 255
        picked = logp.gather(1, lp.clamp(max=18)[:, None])[:, 0]
        return -(picked * valid).sum() / lp.numel()  # ignored pixels count in the mean as zeros (mmseg)

    mse = ((cond - uncond) ** 2).mean()
    torch.testing.assert_close(out["loss_cond"], ce(cond))
    torch.testing.assert_close(out["loss_uncond"], ce(uncond))
    torch.testing.assert_close(out["loss_consistency"], mse)
    torch.testing.assert_close(out["loss"], ce(cond) + ce(uncond) + 1.0 * mse)
    assert mse > 0 and out["logits"].shape == (2, 19, 48, 64) and torch.equal(out["head_logits"], uncond)
    out["loss"].backward()
    assert all(p.grad is not None for p in model.parameters())
    # without IPKL: CE of the unconditional pass only
    plain = build_segmentor(segmentor_config(sd_file, ipkl=False)).train()
    res = plain(x, label)
    assert set(res) >= {"loss", "loss_uncond"} and "loss_cond" not in res
    torch.testing.assert_close(res["loss"], res["loss_uncond"])


# ---------------------------------------------------------------------------------------------- checkpoints
def test_checkpoint_holds_the_head_and_a_reference(sd_file, tmp_path):
    model = build_segmentor(segmentor_config(sd_file)).eval()
    assert model.cfg.diff.fingerprint.startswith("sha256:") and model.cfg.diff.unet == str(Path(sd_file).resolve())
    assert all(k.startswith(("backbone.fusion.", "decode_head.")) for k in model.state_dict())
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == sum(v.numel() for k, v in model.state_dict().items() if not k.endswith(
        ("running_mean", "running_var", "num_batches_tracked")))
    x = torch.randn(1, 3, 64, 96)
    first = model(x)
    assert torch.equal(first, model(x))  # eval mode: the noise comes from eval_seed
    path = save_segmentor(model, tmp_path / "diff.safetensors")
    with safe_open(str(path), "pt") as f:
        keys, meta = list(f.keys()), json.loads(f.metadata()["segmentor_config"])
    assert len(keys) == len(model.state_dict()) and meta["diff"]["fingerprint"] == model.cfg.diff.fingerprint
    assert path.stat().st_size < Path(sd_file).stat().st_size / 2  # the head, not the diffusion model
    loaded = load_segmentor(path)
    assert isinstance(loaded, DIFFSegmentor) and torch.equal(loaded(x), first)
    # other weights at the referenced path: refused, naming the mismatch
    other = StableDiffusion.random("tiny", seed=1)
    moved = tmp_path / "other_sd.safetensors"
    checkpoint.save_native(moved, {"unet": other.unet, "vae": other.vae, "text_encoder": other.text_encoder})
    cfg = asdict(loaded.cfg)
    cfg["diff"]["unet"] = str(moved)
    with pytest.raises(CheckpointError, match="not the ones this DIFF model was trained on"):
        load_segmentor(path, config=cfg)
    cfg["diff"]["fingerprint"] = ""  # accepting other weights is explicit
    assert load_segmentor(path, config=cfg).cfg.diff.fingerprint != model.cfg.diff.fingerprint
    with pytest.raises(CheckpointError, match="--diff-unet"):
        build_segmentor(PRESETS["diff_tiny"])


def test_evaluate_runs_on_a_diff_checkpoint(sd_file, tmp_path):
    """segmentation.evaluate on a DIFF file, also after its frozen weights moved (--diff-unet)."""
    from segmentation.evaluate import main as evaluate_main

    root = write_scenes(tmp_path / "data", 2, size=64)
    weights = tmp_path / "old" / "sd.safetensors"
    weights.parent.mkdir()
    shutil.copy(sd_file, weights)
    model = build_segmentor(segmentor_config(weights))
    path = save_segmentor(model, tmp_path / "diff.safetensors")
    direct = mean_iou(evaluate_dataset(load_segmentor(path), SegDataset(root, "folder"), crop=64, stride=32))
    run = ["--checkpoint", str(path), "--dataset", f"folder:{root}", "--mode", "slide", "--crop", "64", "--stride", "32",
           "--device", "cpu", "--out", str(tmp_path / "eval.json")]
    assert evaluate_main(run) == 0
    assert json.loads((tmp_path / "eval.json").read_text())["results"]["folder"]["mIoU"] == pytest.approx(direct)
    moved = weights.rename(tmp_path / "sd_moved.safetensors")
    with pytest.raises(CheckpointError, match="no such file"):
        evaluate_main(run)
    assert evaluate_main(run + ["--diff-unet", str(moved)]) == 0
    assert json.loads((tmp_path / "eval.json").read_text())["results"]["folder"]["mIoU"] == pytest.approx(direct)
    with pytest.raises(SystemExit, match="not a DIFF checkpoint"):
        evaluate_main(run + ["--checkpoint", str(save_segmentor(build_segmentor("tiny"), tmp_path / "mit.safetensors")),
                             "--diff-unet", str(moved)])


# ---------------------------------------------------------------------------------------------- training
def _run_args(out, src, sd_file, *extra):
    return ["--model", "diff_tiny", "--diff-unet", str(sd_file), "--source", f"folder:{src}", "--crop", "64",
            "--source-scale", "96", "64", "--batch-size", "2", "--log-every", "2", "--lr", "1e-3",
            "--warmup-iters", "1", "--output-dir", str(out), "--device", "cpu", "--num-workers", "0", *extra]


def test_training_logs_the_ipkl_terms_and_resumes_exactly(sd_file, tmp_path):
    src = write_scenes(tmp_path / "src", 3, size=64)
    main(parse_args(_run_args(tmp_path / "a", src, sd_file, "--max-iters", "4", "--ckpt-every", "2",
                              "--keep-last", "2", "--diff-classes", "0", "1", "2")))
    rows = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]
    for r in rows:
        assert r["loss"] == pytest.approx(r["loss_cond"] + r["loss_uncond"] + r["loss_consistency"], rel=1e-5)
    ckpts = sorted((tmp_path / "a" / "checkpoints").glob("step_*.pt"))
    a = torch.load(ckpts[1], weights_only=True)
    assert tuple(a["model_config"]["diff"]["ipkl_classes"]) == (0, 1, 2)
    assert all(k.startswith(("backbone.fusion.", "decode_head.")) for k in a["model"])
    main(parse_args(_run_args(tmp_path / "b", src, sd_file, "--max-iters", "4", "--ckpt-every", "2",
                              "--diff-classes", "0", "1", "2", "--resume", str(ckpts[0]))))
    b = torch.load(tmp_path / "b" / "checkpoints" / "step_0000004.pt", weights_only=True)
    assert all(torch.equal(v, b["model"][k]) for k, v in a["model"].items())
    exported = load_segmentor(tmp_path / "a" / "model.safetensors")
    assert all(torch.equal(v, a["model"][k]) for k, v in exported.state_dict().items())
    with pytest.raises(SystemExit, match="not on DIFF"):
        main(parse_args(_run_args(tmp_path / "c", src, sd_file, "--max-iters", "1", "--fd-lambda", "0.1")))


def test_two_process_gloo_run(sd_file, tmp_path):
    """torchrun with 2 CPU processes (gloo): DIFF + IPKL under DDP (the head runs twice per step),
    sharded evaluation, the export with its reference."""
    src = write_scenes(tmp_path / "src", 4, size=64)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "train.train_segmentation", *_run_args(out, src, sd_file, "--max-iters", "2", "--ckpt-every", "2",
                                                        "--eval", f"folder:{src}", "--eval-every", "2",
                                                        "--eval-mode", "whole")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ck = torch.load(out / "checkpoints" / "step_0000002.pt", weights_only=True)
    assert ck["world_size"] == 2 and ck["model_config"]["diff"]["fingerprint"].startswith("sha256:")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["loss_consistency"] >= 0 and "mIoU/folder" in rows[-1]
    model = load_segmentor(out / "model.safetensors")
    assert all(torch.equal(v, ck["model"][k]) for k, v in model.state_dict().items())
    single = mean_iou(evaluate_dataset(model, SegDataset(src, "folder"), mode="whole"))
    assert rows[-1]["mIoU/folder"] == pytest.approx(single, abs=1e-6)


def test_bench_extraction_rows(tmp_path):
    """bench/diff.py: the extraction rows on the tiny preset (the training row runs the script as above)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_diff", ROOT / "bench" / "diff.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    table = bench.main(["--no-train", "--model", "diff_tiny", "--size", "32", "--batch", "1", "--repeats", "1",
                        "--warmup-calls", "0", "--images", "1", "--workdir", str(tmp_path / "work")])
    rates = [float(line.split(" | ")[2].split()[0]) for line in table.splitlines() if "images/s" in line]
    assert len(rates) == 3 and all(r > 0 for r in rates), table
    assert "batch 3 (2 class prompts)" in table
