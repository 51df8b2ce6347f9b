"""SHADE (segmentation.models.shade and train_segmentation --shade): style hallucination statistics,
Dirichlet weights, farthest-point sampling, the style-consistency loss, and the training wiring."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from segmentation.datasets import SegDataset, TrainSource
from segmentation.models import build_segmentor, load_segmentor
from segmentation.models.shade import (StyleHallucination, attach_style_hallucination, compute_basis,
                                       farthest_point_sample, stage1_features, stage1_statistics,
                                       style_consistency_loss)
from segmentation.transforms import TrainPipeline
from train.train_segmentation import main
from tests.test_seg_train import ROOT, _args, _same_weights, write_scenes


def test_hallucinated_features_take_the_mixed_style():
    torch.manual_seed(0)
    k, c = 5, 8
    sh = StyleHallucination(k, c, concentration=0.5)
    mean, std = torch.randn(k, c), torch.rand(k, c) + 0.5
    sh.set_basis(mean, std)
    x = torch.randn(3, c, 16, 12) * 3 + 2
    w = sh.sample_weights(3)
    clean, new = sh(x, weights=w)
    assert clean is x and new.shape == x.shape
    want_mean, want_std = w @ mean, w @ std
    assert torch.allclose(new.mean(dim=(2, 3)), want_mean, atol=1e-5)
    # (f - mu) / (sigma + 1e-7) has std 1 - 1e-7 / sigma: the mixed std up to that
    assert torch.allclose(new.std(dim=(2, 3)), want_std, rtol=1e-5, atol=1e-5)
    # one basis style with weight 1: exactly that style
    one = torch.zeros(3, k)
    one[:, 2] = 1
    _, new = sh(x, weights=one)
    assert torch.allclose(new.mean(dim=(2, 3)), mean[2].expand(3, c), atol=1e-5)
    assert torch.allclose(new.std(dim=(2, 3)), std[2].expand(3, c), atol=1e-5)
    # the statistics are detached: gradients flow through the normalised features only
    xg = x.clone().requires_grad_(True)
    sh(xg, weights=w)[1].sum().backward()
    assert torch.allclose(xg.grad, (w @ std / (x.std(dim=(2, 3)) + 1e-7))[..., None, None].expand_as(x), atol=1e-5)
    with pytest.raises(RuntimeError):
        StyleHallucination(k, c)(x)  # no basis yet


def test_dirichlet_weights_sum_to_one_and_use_the_concentration():
    torch.manual_seed(0)
    for alpha in (0.0156, 1.0, 50.0):
        w = StyleHallucination(64, 4, concentration=alpha).sample_weights(4000)
        assert w.shape == (4000, 64) and (w >= 0).all()
        assert torch.allclose(w.sum(1), torch.ones(4000), atol=1e-5)
        # Var(w_i) = (1/K)(1 - 1/K) / (K alpha + 1)
        var = (1 / 64) * (1 - 1 / 64) / (64 * alpha + 1)
        assert w.var(0).mean().item() == pytest.approx(var, rel=0.15)
    # SHADE's 0.0156 x 64 ~ 1: the weights are nearly one-hot most of the time
    w = StyleHallucination(64, 4).sample_weights(2000)
    assert w.max(1).values.median() > 0.5


def test_farthest_point_sampling_on_a_hand_built_set():
    pts = torch.tensor([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0], [0.0, 5.0], [9.0, 1.0], [5.0, 5.0]])
    # squared distances to the nearest chosen point, from point 0: [0, 1, 100, 25, 82, 50] -> 2;
    # then [0, 1, 0, 25, 2, 50] -> 5; [0, 1, 0, 25, 2, 0] -> 3; [0, 1, 0, 0, 2, 0] -> 4
    assert farthest_point_sample(pts, 5, start=0).tolist() == [0, 2, 5, 3, 4]
    # from 3: [25, 26, 125, 0, 97, 25] -> 2; then [25, 26, 0, 0, 2, 25] -> 1
    assert farthest_point_sample(pts, 3, start=3).tolist() == [3, 2, 1]
    # more samples than points: once every point is chosen the rest repeat (argmax of zeros -> 0)
    assert farthest_point_sample(pts, 8, start=1).tolist()[6:] == [0, 0]
    assert sorted(farthest_point_sample(pts, 8, start=1).tolist()[:6]) == list(range(6))
    # the first point is uniform over the set (SHADE: np.random.randint(0, N)), seeded here
    starts = {farthest_point_sample(pts, 1, generator=torch.Generator().manual_seed(s)).item() for s in range(40)}
    assert starts == set(range(6))
    a = farthest_point_sample(pts, 4, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, farthest_point_sample(pts, 4, generator=torch.Generator().manual_seed(3)))


def test_style_consistency_loss():
    torch.manual_seed(0)
    a = torch.randn(2, 5, 3, 4)
    assert style_consistency_loss(torch.cat([a, a])).item() == pytest.approx(0.0, abs=1e-6)
    b = torch.randn(2, 5, 3, 4)
    ab, ba = style_consistency_loss(torch.cat([a, b])), style_consistency_loss(torch.cat([b, a]))
    assert ab.item() > 0 and ab.item() == pytest.approx(ba.item(), rel=1e-6)
    # by hand: mean over the 2*3*4 pixels of (KL(p||m) + KL(q||m)) / 2
    p, q = a.softmax(1), b.softmax(1)
    m = ((p + q) / 2).clamp(1e-7, 1)
    kl = lambda u: (u * (u.log() - m.log())).sum(1)  # noqa: E731
    want = ((kl(p) + kl(q)) / 2).sum() / (2 * 3 * 4)
    assert ab.item() == pytest.approx(want.item(), rel=1e-5)
    # bounded by log 2 (Jensen-Shannon)
    far = torch.zeros(2, 2, 1, 1)
    far[0, 0], far[1, 1] = 30, 30
    assert style_consistency_loss(far).item() == pytest.approx(math.log(2), rel=1e-4)
    with pytest.raises(ValueError):
        style_consistency_loss(torch.randn(3, 5, 2, 2))


@pytest.mark.parametrize("preset", ["tiny", "tiny_hrda"])
def test_backbone_doubles_the_batch_in_training_only(preset):
    torch.manual_seed(0)
    model = build_segmentor(preset)
    keys = list(model.state_dict())
    sh = attach_style_hallucination(model)
    c = model.backbone.out_channels[0]
    assert list(model.state_dict()) == keys and sum(1 for _ in sh.parameters()) == 0
    sh.set_basis(torch.randn(64, c), torch.rand(64, c) + 0.1)
    x = torch.randn(2, 3, 64, 64)
    y = torch.randint(0, 19, (2, 64, 64))
    model.train()
    feats = model.backbone(x)
    assert all(f.shape[0] == 4 for f in feats)
    assert torch.equal(feats[0][:2], stage1_features(model.backbone, x))  # the clean half is untouched
    res = model(x, torch.cat([y, y]))
    assert res["head_logits"].shape[0] == 4 and torch.isfinite(res["loss"])
    assert style_consistency_loss(res["head_logits"]).item() > 0
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 19, 64, 64)
    stats = stage1_statistics(model.backbone, x)
    f = stage1_features(model.backbone, x)
    assert stats.shape == (2, 2 * c) and torch.allclose(stats[:, c:], f.std(dim=(2, 3)))


def test_resnet_backbones_are_refused():
    with pytest.raises(ValueError):
        attach_style_hallucination(build_segmentor("tiny_deeplab"))


def _metrics(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_basis_pass_picks_styles_of_the_source_images(tmp_path, one_thread):
    """compute_basis: K of the pooled stage-1 styles (of every source image, model in eval mode), a
    function of (seed, step) only; a capped pass pools that many images; the training mode stays."""
    pipe = TrainPipeline(scale=None, crop=48, cat_max_ratio=1.0, photometric=False, flip_prob=0.0)  # no-op
    sources = [TrainSource(SegDataset(write_scenes(tmp_path / f"s{i}", 3, size=48, seed=i), "folder"), pipe)
               for i in range(2)]
    torch.manual_seed(0)
    model = build_segmentor("tiny").train()
    mean, std, n = compute_basis(model, sources, 4, seed=1, step=0, batch_size=2)
    assert n == 6 and mean.shape == std.shape == (4, model.backbone.out_channels[0]) and model.training
    again = compute_basis(model, sources, 4, seed=1, step=0, batch_size=3)
    assert torch.equal(mean, again[0]) and torch.equal(std, again[1])
    assert not torch.equal(mean, compute_basis(model, sources, 4, seed=1, step=4000, batch_size=2)[0])
    model.eval()
    with torch.no_grad():
        images = [src.pipeline(*src.dataset.load(i), np.random.default_rng(0))[0] for src in sources
                  for i in range(len(src))]
        pooled = stage1_statistics(model.backbone, torch.stack(images))
    basis = torch.cat([mean, std], dim=1)
    hits = [int(torch.isclose(pooled, b, atol=1e-5).all(1).nonzero()[0]) for b in basis]
    assert len(set(hits)) == 4  # four distinct source images
    assert compute_basis(model, sources, 2, seed=1, step=0, max_images=4)[2] == 4


@pytest.mark.parametrize("hrda", [False, True])
def test_shade_training_run_exact_resume_and_export(tmp_path, one_thread, hrda):
    src = write_scenes(tmp_path / "src", 4, size=48)
    gen = write_scenes(tmp_path / "gen", 3, size=32, seed=1, generated=True)
    run = ["--max-iters", "6", "--ckpt-every", "3", "--shade", "--shade-interval", "2", "--shade-images", "3",
           "--shade-basis", "4", "--fd-lambda", "0.5", "--fd-classes", *map(str, range(19)), "--fd-min-ratio", "0"]
    if hrda:
        run += ["--model", "hrda_daformer_mitb5", "--crop", "64"]  # context 32 px: the smallest tiny MiT input
    main(_args(tmp_path / "a", src, gen, *run, "--keep-last", "2"))
    metrics = _metrics(tmp_path / "a")
    assert [m["step"] for m in metrics] == [2, 4, 6]
    for m in metrics:
        assert m["loss_shade"] > 0 and m["loss_fd"] > 0
        assert m["loss"] == pytest.approx(m["loss_ce"] + m["loss_fd"] + m["loss_shade"], rel=1e-6)
    log = (tmp_path / "a" / "log.txt").read_text()
    # basis passes before step 1 and after steps 2, 4, 6; HRDA pools two inputs per image
    assert log.count("SHADE basis of 4 styles from " + ("6" if hrda else "3")) == 4
    c3, c6 = (torch.load(tmp_path / "a" / "checkpoints" / f"step_000000{i}.pt", weights_only=True) for i in (3, 6))
    assert c3["shade_basis"]["mean"].shape == (4, 16) and not any("style" in k for k in c6["model"])
    assert not torch.equal(c3["shade_basis"]["mean"], c6["shade_basis"]["mean"])  # recomputed
    main(_args(tmp_path / "b", src, gen, *run, "--resume", str(tmp_path / "a" / "checkpoints" / "step_0000003.pt")))
    b = torch.load(tmp_path / "b" / "checkpoints" / "step_0000006.pt", weights_only=True)
    assert _same_weights(c6["model"], b["model"])
    assert torch.equal(c6["shade_basis"]["std"], b["shade_basis"]["std"])
    assert "SHADE basis from the checkpoint" in (tmp_path / "b" / "log.txt").read_text()
    # the resumed run really uses the stored basis
    c3["shade_basis"] = {k: v * 3 for k, v in c3["shade_basis"].items()}
    torch.save(c3, tmp_path / "altered.pt")
    main(_args(tmp_path / "c", src, gen, *run, "--resume", str(tmp_path / "altered.pt")))
    c = torch.load(tmp_path / "c" / "checkpoints" / "step_0000006.pt", weights_only=True)
    assert not _same_weights(c6["model"], c["model"])
    # the export is the plain segmentor: loads strictly and evaluates without SHADE
    m = load_segmentor(tmp_path / "a" / "model.safetensors")
    assert getattr(m.backbone, "style_hallucination", None) is None
    assert all(torch.equal(v, c6["model"][k]) for k, v in m.state_dict().items())
    with torch.no_grad():
        assert m(torch.randn(1, 3, 64, 64)).shape == (1, 19, 64, 64)


def test_shade_two_process_gloo_run(tmp_path):
    """2 CPU processes: both ranks pool their share of the basis images and use the same basis."""
    src = write_scenes(tmp_path / "src", 4, size=48)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "train.train_segmentation", "--tiny", "--device", "cpu", "--num-workers", "0",
           "--source", f"folder:{src}", "--crop", "32", "--source-scale", "64", "64", "--batch-size", "2",
           "--log-every", "2", "--ckpt-every", "2", "--max-iters", "4", "--output-dir", str(out),
           "--shade", "--shade-interval", "2", "--shade-images", "3", "--shade-basis", "4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    metrics = _metrics(out)
    assert [m["step"] for m in metrics] == [2, 4] and all(m["loss_shade"] > 0 for m in metrics)
    assert "SHADE basis of 4 styles from 3 stage-1 styles" in (out / "log.txt").read_text()
    ck = torch.load(out / "checkpoints" / "step_0000004.pt", weights_only=True)
    assert ck["shade_basis"]["mean"].shape == (4, 16)
