"""Segmentation training: optimizer groups, schedule, overfitting, the torchrun script (DDP, resume)."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from segmentation.datasets import SegDataset
from segmentation.evaluate import evaluate_dataset
from segmentation.labels import colorize
from segmentation.metrics import mean_iou
from segmentation.models import build_segmentor, load_segmentor
from segmentation.optim import lr_factor, param_groups
from segmentation.synthetic import street_scene
from train.train_segmentation import main, parse_args

ROOT = Path(__file__).resolve().parents[1]


def write_scenes(root, n, size=64, seed=0, noise=10.0, generated=False):
    """Synthetic street layouts and label-coloured images with Gaussian noise, as a 'folder'
    dataset (or a DGInStyle output folder with a manifest when ``generated``)."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        lab = street_scene(size, size, seed=[seed, i])
        img = np.clip(colorize(lab) + rng.normal(0, noise, lab.shape + (3,)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / "images" / f"{i:04d}.png")
        Image.fromarray(lab).save(root / "labels" / f"{i:04d}_labelTrainIds.png")
        lines.append(json.dumps({"id": f"{i:04d}", "image": f"images/{i:04d}.png",
                                 "label": f"labels/{i:04d}_labelTrainIds.png"}))
    if generated:
        (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_param_groups_follow_mmcv_custom_keys():
    model = build_segmentor("tiny")
    groups = param_groups(model, lr=6e-5, weight_decay=0.01)
    by_name = {n: g for g in groups for n in g["param_names"]}
    assert set(by_name) == {n for n, _ in model.named_parameters()}
    for name, g in by_name.items():
        if name.startswith("decode_head."):
            assert g["lr"] == pytest.approx(6e-4) and g["weight_decay"] == 0.01, name
        elif "norm" in name:  # backbone LayerNorms (patch_embed*.norm, block*.norm1/2, attn.norm, norm1..4)
            assert g["lr"] == pytest.approx(6e-5) and g["weight_decay"] == 0.0, name
        else:
            assert g["lr"] == pytest.approx(6e-5) and g["weight_decay"] == 0.01, name
    assert "backbone.block1.0.attn.norm.weight" in by_name and by_name["backbone.norm4.bias"]["weight_decay"] == 0.0


def test_poly_schedule_with_linear_warmup():
    assert lr_factor(0, 40000) == pytest.approx(1e-6)  # warmup starts at ratio 1e-6
    # mmcv: warmup_lr = regular * (1 - (1 - it / 1500) * (1 - 1e-6)), regular = 1 - it / 40000
    assert lr_factor(750, 40000) == pytest.approx((1 - 750 / 40000) * (0.5 + 0.5e-6))
    assert lr_factor(1500, 40000) == pytest.approx(1 - 1500 / 40000)
    assert lr_factor(20000, 40000) == pytest.approx(0.5)
    assert lr_factor(39999, 40000) == pytest.approx(1 / 40000)
    warm = [lr_factor(i, 40000) for i in range(0, 1500, 50)]
    assert warm == sorted(warm)
    assert lr_factor(10, 100, warmup_iters=0, power=2.0) == pytest.approx(0.81)




def test_tiny_model_overfits_synthetic_layouts(tmp_path, one_thread):
    """The model, loss and optimizer can learn: two label-coloured street layouts at 64x64 are
    segmented to mIoU > 0.8 (scored by the evaluation code on the files; ~0.88 with these seeds,
    ~10 s). The tiny classes (1-px poles, a few-pixel signs) are what keeps it below 1 at a
    stride-4 decoder."""
    tic = time.perf_counter()
    root = write_scenes(tmp_path, 2, size=64)
    ds = SegDataset(root, "folder", test_scale=None)
    items = [ds[i] for i in range(len(ds))]
    x = torch.stack([it["image"] for it in items])
    y = torch.stack([it["label"] for it in items])
    torch.manual_seed(0)
    model = build_segmentor("tiny", dropout=0.0).train()
    before = mean_iou(evaluate_dataset(model, ds, mode="whole"))
    steps, lr = 800, 3e-2
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    for it in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * lr_factor(it, steps, warmup_iters=20)
        loss = F.cross_entropy(model(x), y, ignore_index=255)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    miou = mean_iou(evaluate_dataset(model, ds, mode="whole"))
    print(f"mIoU {before:.3f} -> {miou:.3f} in {time.perf_counter() - tic:.1f} s")
    assert before < 0.2 and miou > 0.8


def _args(out, src, gen, *extra):
    return parse_args(["--tiny", "--source", f"folder:{src}", "--generated", str(gen), "--crop", "32",
                       "--source-scale", "64", "64", "--batch-size", "2", "--log-every", "2", "--lr", "1e-3",
                       "--warmup-iters", "2", "--output-dir", str(out), "--device", "cpu", "--num-workers", "0",
                       *extra])


def test_resume_continues_exactly(tmp_path, one_thread):
    src = write_scenes(tmp_path / "src", 3, size=48)
    gen = write_scenes(tmp_path / "gen", 3, size=32, seed=1, generated=True)
    main(_args(tmp_path / "a", src, gen, "--max-iters", "6", "--ckpt-every", "3", "--keep-last", "2"))
    ckpts = sorted((tmp_path / "a" / "checkpoints").glob("step_*.pt"))
    assert [p.name for p in ckpts] == ["step_0000003.pt", "step_0000006.pt"]
    # a second run restarted from step 3 ends with exactly the same weights and optimizer state
    main(_args(tmp_path / "b", src, gen, "--max-iters", "6", "--ckpt-every", "3", "--resume", str(ckpts[0])))
    a = torch.load(ckpts[1], weights_only=True)
    b = torch.load(tmp_path / "b" / "checkpoints" / "step_0000006.pt", weights_only=True)
    assert a["step"] == b["step"] == 6 and a["model_config"] == b["model_config"]
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert torch.equal(a["optimizer"]["state"][0]["exp_avg"], b["optimizer"]["state"][0]["exp_avg"])
    start = torch.load(ckpts[0], weights_only=True)["model"]
    assert any(not torch.equal(start[k], v) for k, v in a["model"].items())  # it did train
    m = load_segmentor(tmp_path / "a" / "model.safetensors")  # the export equals the last checkpoint
    assert all(torch.equal(v, a["model"][k]) for k, v in m.state_dict().items())
    metrics = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [2, 4, 6] and all(0 <= m["generated_share"] <= 1 for m in metrics)


def test_resume_in_the_same_folder_logs_each_step_once(tmp_path, one_thread):
    """Resuming in the run's own folder from an earlier checkpoint drops the metrics rows logged after
    it (training and evaluation rows alike): the resumed run logs those steps again, once, and
    metrics.jsonl ends as an uninterrupted run's."""
    src = write_scenes(tmp_path / "src", 3, size=48)
    gen = write_scenes(tmp_path / "gen", 3, size=32, seed=1, generated=True)
    run = ["--max-iters", "6", "--ckpt-every", "3", "--keep-last", "2", "--eval", f"folder:{src}",
           "--eval-every", "3", "--eval-mode", "whole"]
    out = tmp_path / "run"
    main(_args(out, src, gen, *run))
    first = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in first] == [2, 3, 4, 6, 6]
    main(_args(out, src, gen, *run, "--resume", str(out / "checkpoints" / "step_0000003.pt")))
    again = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in again] == [2, 3, 4, 6, 6]
    assert again[:2] == first[:2]  # the rows up to the checkpoint are kept as they were
    assert again[2].keys() == first[2].keys()  # step 4 (its loss averages steps 3-4 before, 4 alone after)
    for a, b in zip(first[3:], again[3:]):  # step 6, whose log interval (5-6) both runs trained alike
        assert a.keys() == b.keys()
        assert all(a[k] == b[k] for k in a if k.startswith(("loss", "mIoU")) or k == "generated_share")


FD_ALL = ["--fd-lambda", "0.5", "--fd-classes", *map(str, range(19)), "--fd-min-ratio", "0"]  # 32-px crops: one
# stride-32 cell per image, which is rarely 75 % one thing class; count every labelled cell instead


def _same_weights(a, b):
    return all(torch.equal(v, b[k]) for k, v in a.items())


def test_feature_distance_run_and_exact_resume(tmp_path, one_thread):
    """--fd-lambda adds lambda * FD to the loss (logged as loss_fd); without --pretrained the frozen
    reference travels in the checkpoint, and a resumed run uses it: same weights as uninterrupted,
    different weights from a checkpoint whose reference was altered."""
    src = write_scenes(tmp_path / "src", 3, size=48)
    gen = write_scenes(tmp_path / "gen", 3, size=32, seed=1, generated=True)
    run = ["--max-iters", "6", "--ckpt-every", "3", *FD_ALL]
    main(_args(tmp_path / "a", src, gen, *run, "--keep-last", "2"))
    metrics = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [2, 4, 6]
    for m in metrics:
        assert m["loss"] == pytest.approx(m["loss_ce"] + m["loss_fd"], rel=1e-6)
    assert metrics[0]["loss_fd"] >= 0 and metrics[-1]["loss_fd"] > 0  # step 1 is at the reference itself
    c3, c6 = (torch.load(tmp_path / "a" / "checkpoints" / f"step_000000{i}.pt", weights_only=True) for i in (3, 6))
    ref = c3["fd_backbone"]
    assert _same_weights(ref, c6["fd_backbone"])  # frozen
    trained = {k[len("backbone."):]: v for k, v in c6["model"].items() if k.startswith("backbone.")}
    assert trained.keys() == ref.keys() and not _same_weights(ref, trained)
    main(_args(tmp_path / "b", src, gen, *run, "--resume", str(tmp_path / "a" / "checkpoints" / "step_0000003.pt")))
    b = torch.load(tmp_path / "b" / "checkpoints" / "step_0000006.pt", weights_only=True)
    assert _same_weights(c6["model"], b["model"]) and _same_weights(ref, b["fd_backbone"])
    assert torch.equal(c6["optimizer"]["state"][0]["exp_avg"], b["optimizer"]["state"][0]["exp_avg"])
    # the resumed run really reads the reference from the checkpoint
    c3["fd_backbone"] = {k: v * 1.1 if v.is_floating_point() else v for k, v in ref.items()}
    torch.save(c3, tmp_path / "altered.pt")
    main(_args(tmp_path / "c", src, gen, *run, "--resume", str(tmp_path / "altered.pt")))
    c = torch.load(tmp_path / "c" / "checkpoints" / "step_0000006.pt", weights_only=True)
    assert not _same_weights(c6["model"], c["model"])


def test_feature_distance_with_pretrained_resumes_from_the_file(tmp_path, one_thread):
    """With --pretrained the reference is those weights: not stored, rebuilt from the file on resume
    (a reference copied after the checkpoint's weights were loaded would break the equality)."""
    from segmentation.models.mit import export_pretrained
    torch.manual_seed(123)
    weights = export_pretrained(build_segmentor("tiny").backbone, tmp_path / "mit_tiny.pth")
    src = write_scenes(tmp_path / "src", 3, size=48)
    gen = write_scenes(tmp_path / "gen", 3, size=32, seed=1, generated=True)
    run = ["--max-iters", "4", "--ckpt-every", "2", "--pretrained", str(weights), *FD_ALL]
    main(_args(tmp_path / "a", src, gen, *run, "--keep-last", "2"))
    c2, c4 = (torch.load(tmp_path / "a" / "checkpoints" / f"step_000000{i}.pt", weights_only=True) for i in (2, 4))
    assert "fd_backbone" not in c4
    main(_args(tmp_path / "b", src, gen, *run, "--resume", str(tmp_path / "a" / "checkpoints" / "step_0000002.pt")))
    b = torch.load(tmp_path / "b" / "checkpoints" / "step_0000004.pt", weights_only=True)
    assert _same_weights(c4["model"], b["model"])
    assert not _same_weights(c2["model"], c4["model"])
    assert "backbone from" in (tmp_path / "b" / "log.txt").read_text()


def test_two_process_gloo_run(tmp_path):
    """torchrun with 2 CPU processes (gloo): DDP training on mixed data with the feature distance,
    sharded evaluation, a rank-0 checkpoint with both ranks' RNG states, the export, then a resumed run."""
    src = write_scenes(tmp_path / "src", 4, size=48)
    gen = write_scenes(tmp_path / "gen", 4, size=32, seed=1, generated=True)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "train.train_segmentation", "--tiny", "--device", "cpu", "--num-workers", "0",
           "--source", f"folder:{src}", "--generated", f"dginstyle:{gen}", "--mix-ratio", "1:1",
           "--crop", "32", "--source-scale", "64", "64", "--batch-size", "2", "--log-every", "2",
           "--ckpt-every", "2", "--keep-last", "1", "--eval", f"folder:{src}", "--eval-every", "4",
           "--eval-mode", "whole", "--output-dir", str(out), *FD_ALL]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run(cmd + ["--max-iters", "4"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ck = torch.load(out / "checkpoints" / "step_0000004.pt", weights_only=True)
    assert ck["world_size"] == 2 and len(ck["rng"]) == 2
    assert not torch.equal(ck["rng"][0]["torch"], ck["rng"][1]["torch"])  # per-rank seeds
    assert [p.name for p in (out / "checkpoints").glob("*.pt")] == ["step_0000004.pt"]  # keep-last 1
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [2, 4, 4] and "mIoU/folder" in metrics[-1]
    m = metrics[1]
    assert m["loss_fd"] > 0 and m["loss"] == pytest.approx(m["loss_ce"] + m["loss_fd"])
    log = (out / "log.txt").read_text()
    assert "rank 0/2" in log and "P(generated) = 0.500" in log
    # the sharded evaluation, all-reduced, equals a single-process evaluation of the same weights
    model = load_segmentor(out / "model.safetensors")
    assert all(torch.equal(v, ck["model"][k]) for k, v in model.state_dict().items())
    single = mean_iou(evaluate_dataset(model, SegDataset(src, "folder"), mode="whole"))
    assert metrics[-1]["mIoU/folder"] == pytest.approx(single, abs=1e-6)
    r = subprocess.run(cmd + ["--max-iters", "6", "--resume", "auto"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "resumed from" in (out / "log.txt").read_text()
    assert [p.name for p in (out / "checkpoints").glob("*.pt")] == ["step_0000006.pt"]


def test_divergence_stops_the_run_with_finite_checkpoints_only(tmp_path, one_thread):
    from train.common import TrainingDiverged, list_checkpoints, load_checkpoint, non_finite

    src = write_scenes(tmp_path / "src", 3, size=48)
    gen = write_scenes(tmp_path / "gen", 3, size=32, seed=1, generated=True)
    out = tmp_path / "a"
    with pytest.raises(TrainingDiverged, match="non-finite|NaN"):
        main(_args(out, src, gen, "--max-iters", "60", "--ckpt-every", "1", "--keep-last", "2", "--lr", "1e6",
                   "--warmup-iters", "0", "--max-bad-steps", "3"))
    kept = list_checkpoints(out / "checkpoints")
    assert kept and not any(non_finite(load_checkpoint(p)["model"]) for p in kept)
    assert not (out / "model.safetensors").exists()


def test_a_skipped_step_leaves_the_batchnorm_statistics_as_they_were(tmp_path, one_thread, monkeypatch):
    """A NaN batch skips its update, and its forward's move of the running statistics is undone: they
    would stay NaN for the rest of the run."""
    from train import common
    from train.common import list_checkpoints, load_checkpoint

    build = common.build_segmentation_model

    def nan_second_batch(*a, **k):
        model, fd = build(*a, **k)
        forward, calls = model.forward, []

        def wrapped(image, *rest, **kw):
            calls.append(1)
            return forward(image * float("nan") if len(calls) == 2 else image, *rest, **kw)

        model.forward = wrapped
        return model, fd

    monkeypatch.setattr(common, "build_segmentation_model", nan_second_batch)
    src = write_scenes(tmp_path / "src", 3, size=48)
    gen = write_scenes(tmp_path / "gen", 3, size=32, seed=1, generated=True)
    out = tmp_path / "a"
    main(_args(out, src, gen, "--max-iters", "3", "--ckpt-every", "1", "--keep-last", "3", "--eval-every", "0"))
    steps = [load_checkpoint(p)["model"] for p in list_checkpoints(out / "checkpoints")]
    stats = [k for k in steps[0] if k.endswith("running_mean") or k.endswith("running_var")]
    assert stats and all(torch.isfinite(v).all() for m in steps for v in m.values() if v.is_floating_point())
    assert all(torch.equal(steps[0][k], steps[1][k]) for k in steps[0])  # step 2: weights and statistics kept
    assert not all(torch.equal(steps[1][k], steps[2][k]) for k in stats)  # step 3 trained and moved them
    assert "non-finite loss or gradient" in (out / "log.txt").read_text()


def test_resume_uses_the_new_learning_rate(tmp_path, one_thread):
    src = write_scenes(tmp_path / "src", 3, size=48)
    gen = write_scenes(tmp_path / "gen", 3, size=32, seed=1, generated=True)
    main(_args(tmp_path / "a", src, gen, "--max-iters", "6"))
    main(_args(tmp_path / "b", src, gen, "--max-iters", "3", "--ckpt-every", "3"))
    main(_args(tmp_path / "b", src, gen, "--max-iters", "6", "--resume", "auto", "--lr", "2e-3"))
    lr = lambda out: [json.loads(x)["lr"] for x in (out / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    a, b = lr(tmp_path / "a"), lr(tmp_path / "b")
    assert b[-1] == pytest.approx(2 * a[-1])  # step 6, where both schedules have the same factor
    assert "lr: 0.001 -> 0.002" in (tmp_path / "b" / "log.txt").read_text()
